//! Hostile input against the real binaries: a raw gRPC client (generated from `proto/`)
//! playing a malicious client or agent, real agents in their own stores, real Nix. Each test
//! asserts what a user relies on: nothing written outside the work dir, every run builds its
//! own sources, no forged result is believed, the coordinator keeps serving, memory stays
//! bounded.

use nixfarm_proto::v1 as pb;
use nixfarm_proto::v1::agent_service_client::AgentServiceClient;
use nixfarm_proto::v1::run_service_client::RunServiceClient;
use nixfarm_tests::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

// ----- helpers ----------------------------------------------------------------------------

async fn run_client(url: &str) -> RunServiceClient<Channel> {
    RunServiceClient::connect(url.to_string())
        .await
        .expect("connect")
        .max_decoding_message_size(64 << 20)
}

async fn agent_client(url: &str) -> AgentServiceClient<Channel> {
    AgentServiceClient::connect(url.to_string())
        .await
        .expect("connect")
}

/// A one-job agent's registration, its first message.
fn register_message(name: &str, system: &str) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Register(pb::Register {
            name: name.into(),
            systems: vec![system.into()],
            max_jobs: 1,
            ..Default::default()
        })),
    }
}

/// An agent played by hand over the real protocol: what it sends, and what it is sent.
struct FakeAgent {
    tx: tokio::sync::mpsc::Sender<pb::AgentMessage>,
    from: tonic::Streaming<pb::CoordinatorMessage>,
    /// Its registration's session key.
    session: String,
}

impl FakeAgent {
    /// Registers the one-job agent `name` for `system`; returns once it is registered.
    async fn register(url: &str, name: &str, system: &str) -> FakeAgent {
        let mut ac = agent_client(url).await;
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::AgentMessage>(8);
        tx.send(register_message(name, system)).await.unwrap();
        let mut from = ac
            .connect_agent(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let registered = from.message().await.unwrap().unwrap();
        let Some(pb::coordinator_message::Msg::Registered(r)) = registered.msg else {
            panic!("not registered: {registered:?}");
        };
        FakeAgent {
            tx,
            from,
            session: r.session_key,
        }
    }

    async fn send(&self, msg: pb::agent_message::Msg) {
        self.tx
            .send(pb::AgentMessage { msg: Some(msg) })
            .await
            .unwrap();
    }

    /// Heartbeats every half second until the task is aborted: the agent stays connected
    /// however long the test keeps it idle.
    fn keep_alive(&self) -> tokio::task::JoinHandle<()> {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            loop {
                let beat = pb::AgentMessage {
                    msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat::default())),
                };
                if tx.send(beat).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    }

    /// The next job it is handed.
    async fn assignment(&mut self) -> pb::Assignment {
        loop {
            if let Some(pb::coordinator_message::Msg::Assign(a)) =
                self.from.message().await.unwrap().unwrap().msg
            {
                return a;
            }
        }
    }

    /// Takes the listing it is handed and answers that the repository is the one package
    /// `attr`, evaluated to `node` (a derivation of its choosing).
    async fn answer_listing(&mut self, attr: &str, node: pb::DrvNode) {
        let a = self.assignment().await;
        assert!(
            matches!(a.job, Some(pb::assignment::Job::EvalList(_))),
            "{a:?}"
        );
        self.send(pb::agent_message::Msg::EvalList(pb::EvalListResult {
            attempt_id: a.attempt_id,
            attrs: vec![attr.into()],
            evaluated: Some(pb::EvalChunkResult {
                attrs: vec![pb::EvaluatedAttr {
                    attr: attr.into(),
                    drv_path: node.drv_path.clone(),
                    outputs: node.outputs.clone(),
                    system: node.system.clone(),
                    ..Default::default()
                }],
                drvs: vec![node],
                ..Default::default()
            }),
            ..Default::default()
        }))
        .await;
    }
}

/// Uploads `bytes` as a snapshot, in 1 MiB chunks.
async fn upload(c: &mut RunServiceClient<Channel>, bytes: &[u8]) -> Result<String, tonic::Status> {
    let chunks: Vec<pb::SourceChunk> = bytes
        .chunks(1 << 20)
        .map(|c| pb::SourceChunk { data: c.to_vec() })
        .collect();
    Ok(c.upload_source(tokio_stream::iter(chunks))
        .await?
        .into_inner()
        .digest)
}

type Entry<'a> = (&'a str, tar::EntryType, &'a str);

/// A hand-made tar: (path, type, link target or file content), names written raw so that
/// nothing on the way refuses them.
fn raw_tar(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, kind, extra) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        let data: &[u8] = if *kind == tar::EntryType::Regular {
            extra.as_bytes()
        } else {
            b""
        };
        h.set_size(data.len() as u64);
        if path.len() < 100 && extra.len() < 100 {
            h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            if *kind != tar::EntryType::Regular {
                h.as_old_mut().linkname[..extra.len()].copy_from_slice(extra.as_bytes());
            }
            h.set_cksum();
            b.append(&h, data).unwrap();
        } else {
            // Long names go through the GNU long-name entry, as a real tar would write them.
            if *kind == tar::EntryType::Regular {
                b.append_data(&mut h, path, data).unwrap();
            } else {
                b.append_link(&mut h, path, extra).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

use tar::EntryType::{Directory as D, Link as H, Regular as F, Symlink as L};

/// The escape the trust-boundaries issue found: `a -> .` makes a deep path shallow, so a
/// `..` chain that looks lexically inside the tree leaves it; then a file beneath it.
fn self_link_escape(target_file: &Path) -> Vec<u8> {
    let deep = "a/".repeat(12);
    let up = "../".repeat(12);
    raw_tar(&[
        ("flake.nix", F, "{ outputs = _: {}; }"),
        ("a", L, "."),
        (&format!("{deep}esc"), L, &up),
        (&format!("esc{}", target_file.display()), F, "pwned"),
    ])
}

/// A flake with one package that writes `text` into its output (and `slow` seconds of
/// sleep first).
fn flake(dir: &Path, name: &str, text: &str, slow: u32) -> PathBuf {
    let repo = dir.join(name);
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(
        repo.join("flake.nix"),
        format!(
            r#"{{ outputs = {{ self }}: {{ packages.x86_64-linux.{name} = derivation {{
      name = "{name}"; system = "x86_64-linux"; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
      args = [ "-c" "sleep {slow}; echo {text} > $out" ]; }}; }}; }}"#
        ),
    )
    .unwrap();
    repo
}

fn report_json(url: &str, run: &str) -> serde_json::Value {
    serde_json::from_str(&stdout(&cli(url, &["report", run, "--format", "json"]))).unwrap()
}

fn wait_terminal(url: &str, run: &str, timeout: Duration) -> serde_json::Value {
    wait_for(timeout, &format!("run {run} to end"), || {
        let r = report_json(url, run);
        ["finished", "failed", "cancelled"]
            .contains(&r["state"].as_str().unwrap_or(""))
            .then_some(r)
    })
}

/// [`wait_terminal`] from async code (off the runtime's threads), two minutes at most.
async fn wait_terminal_async(url: &str, run: &str) -> serde_json::Value {
    let (url, run) = (url.to_string(), run.to_string());
    tokio::task::spawn_blocking(move || wait_terminal(&url, &run, Duration::from_secs(120)))
        .await
        .unwrap()
}

fn config_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[path = "hostile/sources.rs"]
mod sources;

#[path = "hostile/derivations.rs"]
mod derivations;

#[path = "hostile/evaluation.rs"]
mod evaluation;

#[path = "hostile/builds.rs"]
mod builds;

// ----- agents bound to their attempts -----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_result_or_a_stolen_name_changes_nothing() {
    let dir = scratch();
    // This coordinator lets local references through: the agent still refuses them.
    let cfg = config_file(
        dir.path(),
        "coordinator.toml",
        "allow_local_flake_refs = true\n[scheduler]\nlease_secs = 30\nheartbeat_secs = 1\n",
    );
    let state = dir.path().join("coordinator");
    let coordinator =
        Coordinator::start_on(&state, "127.0.0.1:0", &["--config", cfg.to_str().unwrap()]).unwrap();
    let url = coordinator.url.clone();
    let host = Host::new(&dir.path().join("host"));
    let _x = host.start_agent("x", &url, None, 1).unwrap();
    let repo = flake(dir.path(), "slow", "built-by-x", 6);
    let out = cli(&url, &["submit", repo.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = stdout(&out).trim().to_string();
    let attempt: String = wait_for(Duration::from_secs(60), "x to start building", || {
        coordinator
            .db()
            .query_row(
                "SELECT id FROM attempts WHERE run_id = ?1 AND kind = 'build' AND state = 'running'",
                [&run],
                |r| r.get(0),
            )
            .ok()
    });

    // Agent y (it builds for another system, so it is given nothing) reports x's build as
    // done, with a path nobody built.
    let y = FakeAgent::register(&url, "y", "aarch64-linux").await;
    let forged = "/nix/store/zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-slow".to_string();
    y.send(pb::agent_message::Msg::Build(pb::BuildResult {
        attempt_id: attempt.clone(),
        status: pb::BuildStatus::Built as i32,
        outputs: vec![pb::DrvOutput {
            name: "out".into(),
            path: forged.clone(),
            ..Default::default()
        }],
        ..Default::default()
    }))
    .await;

    // Someone registers under x's name while x is connected: refused, x keeps its stream.
    let (tx2, rx2) = tokio::sync::mpsc::channel::<pb::AgentMessage>(8);
    tx2.send(register_message("x", "x86_64-linux"))
        .await
        .unwrap();
    let e = agent_client(&url)
        .await
        .connect_agent(tokio_stream::wrappers::ReceiverStream::new(rx2))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e}");
    assert!(e.message().contains("already connected"), "{e}");

    // And claims uploads in x's name without x's session key: refused.
    let e = agent_client(&url)
        .await
        .claim_uploads(pb::ClaimUploadsRequest {
            agent: "x".into(),
            cache: "file:///tmp/c".into(),
            paths: vec![forged.clone()],
            release: true,
            session_key: String::new(),
            attempt: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    // In its own name, with its own key, y claims the uploads of x's attempt (a claim
    // makes others wait for the path): refused, as it holds no such attempt.
    let e = agent_client(&url)
        .await
        .claim_uploads(pb::ClaimUploadsRequest {
            agent: "y".into(),
            cache: "file:///tmp/c".into(),
            paths: vec![forged.clone()],
            release: false,
            session_key: y.session.clone(),
            attempt: attempt.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(e.message().contains("no attempt the agent holds"), "{e}");

    let r = wait_terminal(&url, &run, Duration::from_secs(120));
    let p = &r["packages"][0];
    assert_eq!(p["status"], "ready", "{r}");
    assert_eq!(p["agent"], "x", "{r}");
    let path = p["outputs"]["out"].as_str().unwrap();
    assert_ne!(path, forged);
    assert!(
        host.has_path(path),
        "x's own output is what the report names"
    );
    let agents = stdout(&cli(&url, &["agents"]));
    assert!(agents.contains("protocol violations"), "{agents}");
    assert!(agents.lines().any(|l| l.trim() == "y: 1"), "{agents}");
    // y, played by hand with a registration of before held outputs, is listed as such;
    // x, a real agent, is not.
    let older = agents
        .split_once("predating held outputs")
        .map(|(_, rest)| rest.split("\n\n").next().unwrap_or(""))
        .unwrap_or_else(|| panic!("{agents}"));
    let older: Vec<&str> = older.lines().skip(1).map(str::trim).collect();
    assert_eq!(older, ["y"], "{agents}");
    // x connected once: the clash did not close its stream.
    let log = coordinator.proc.log_text();
    let x_connects = log
        .lines()
        .filter(|l| l.contains("agent connected") && l.contains("agent=\"x\""))
        .count();
    assert_eq!(x_connects, 1, "{log}");
    drop(y);

    // The coordinator allows path:, the agent does not: refused there, nothing copied.
    let out = cli(&url, &["submit", "path:/etc"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = stdout(&out).trim().to_string();
    let r = wait_terminal(&url, &run, Duration::from_secs(60));
    assert_eq!(r["state"], "failed", "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("agent's own disk"),
        "{r}"
    );
    let copied_etc = std::fs::read_dir(host.root.join("nix/store"))
        .unwrap()
        .flatten()
        .any(|e| e.path().join("shadow").exists());
    assert!(!copied_etc, "/etc was copied into the agent's store");
}

// ----- authentication, configuration and flags --------------------------------------------

/// Guessing tokens over gRPC is bounded per address: after 10 wrong client or agent tokens
/// in a minute, an address is refused (RESOURCE_EXHAUSTED) even with the right token, and
/// says so; the count is one for both services.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_tokens_over_grpc_hold_back_their_address() {
    let dir = scratch();
    let client = config_file(dir.path(), "client-token", "right-client-token\n");
    let agent = config_file(dir.path(), "agent-token", "right-agent-token\n");
    let cfg = config_file(
        dir.path(),
        "c.toml",
        &format!(
            "[auth]\nclient_token_file = \"{}\"\nagent_token_file = \"{}\"\n",
            client.display(),
            agent.display()
        ),
    );
    let coordinator = Coordinator::start_on(
        &dir.path().join("coordinator"),
        "127.0.0.1:0",
        &["--config", cfg.to_str().unwrap()],
    )
    .unwrap();
    let mut c = run_client(&coordinator.url).await;
    let list = |token: &str| {
        let mut r = tonic::Request::new(pb::ListRunsRequest::default());
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        r
    };
    assert!(c.list_runs(list("right-client-token")).await.is_ok());
    for i in 0..5 {
        let e = c.list_runs(list(&format!("guess-{i}"))).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    }
    // Five more as an agent: the same count.
    let mut a = agent_client(&coordinator.url).await;
    for i in 0..5 {
        let mut r = tonic::Request::new(pb::ClaimUploadsRequest::default());
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer agent-guess-{i}").parse().unwrap(),
        );
        let e = a.claim_uploads(r).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    }
    let e = c.list_runs(list("right-client-token")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("too many wrong tokens"), "{e:?}");
    assert!(!e.message().contains("right-client-token"), "{e:?}");
}

#[test]
fn bad_configuration_stops_the_coordinator_with_the_field_named() {
    let dir = scratch();
    let empty = config_file(dir.path(), "empty-token", "  \n\t\n");
    let cases = [
        (
            format!("[auth]\nagent_token_file = \"{}\"\n", empty.display()),
            "is empty",
        ),
        (
            format!("[auth]\nclient_token_file = \"{}\"\n", empty.display()),
            "is empty",
        ),
        ("[scheduler]\nheartbeat_secs = 0\n".into(), "heartbeat_secs"),
        ("[scheduler]\nlease_secs = 0\n".into(), "lease_secs"),
        (
            "[scheduler]\neval_chunk_size = 0\n".into(),
            "eval_chunk_size",
        ),
        (
            "[limits]\nsnapshot_max_bytes = 10000000000\n".into(),
            "snapshot_max_bytes",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let cfg = config_file(dir.path(), &format!("c{i}.toml"), text);
        let err = Coordinator::start_on(
            &dir.path().join(format!("state{i}")),
            "127.0.0.1:0",
            &["--config", cfg.to_str().unwrap()],
        )
        .err()
        .unwrap_or_else(|| panic!("started with {text}"))
        .to_string();
        assert!(err.contains(want), "{text}: {err}");
    }
    // An agent with an empty token file does not start either.
    let out = std::process::Command::new(bin("nixfarm-agent"))
        .args(["--coordinator", "http://127.0.0.1:9", "--name", "t"])
        .arg("--token-file")
        .arg(&empty)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is empty"), "{}", stderr(&out));

    // Beyond loopback without TLS or tokens: said at start-up.
    let open = Coordinator::start_on(&dir.path().join("open"), "0.0.0.0:0", &[]).unwrap();
    let log = wait_for(Duration::from_secs(10), "the warning", || {
        let l = open.proc.log_text();
        l.contains("beyond loopback").then_some(l)
    });
    assert!(
        log.contains("without TLS") && log.contains("agent token"),
        "{log}"
    );
    let quiet = Coordinator::start(&dir.path().join("quiet")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!quiet.proc.log_text().contains("beyond loopback"));

    // Flags out of range are refused with the range, before anything runs.
    for args in [
        vec!["report", "r0123456789abcdef", "--fail-under", "200"],
        vec!["report", "r0123456789abcdef", "--fail-under", "NaN"],
        vec!["local", ".", "--jobs", "0"],
        vec!["local", ".", "--max-rounds", "0"],
    ] {
        let out = cli("http://127.0.0.1:9", &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = stderr(&out);
        assert!(
            err.contains("0 to 100") || err.contains("1..=4096") || err.contains("1..=100"),
            "{args:?}: {err}"
        );
    }
}

// ----- bounded strings, one source of limits ----------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_strings_are_refused_without_being_echoed_and_limits_agree() {
    let dir = scratch();
    let cfg = config_file(
        dir.path(),
        "c.toml",
        "[limits]\nsnapshot_max_bytes = 1048576\n",
    );
    let state = dir.path().join("coordinator");
    let coordinator =
        Coordinator::start_on(&state, "127.0.0.1:0", &["--config", cfg.to_str().unwrap()]).unwrap();
    let url = coordinator.url.clone();
    let mut c = run_client(&url).await;
    let remote = || {
        Some(pb::Source {
            kind: Some(pb::source::Kind::FlakeRef("github:owner/repo".into())),
        })
    };
    let bad = [
        pb::SubmitRunRequest {
            source: remote(),
            label: "L".repeat(70_000),
            ..Default::default()
        },
        pb::SubmitRunRequest {
            source: remote(),
            attrs: vec!["a".repeat(10_000)],
            ..Default::default()
        },
        pb::SubmitRunRequest {
            source: remote(),
            attr_path: "p".repeat(100_000),
            ..Default::default()
        },
        pb::SubmitRunRequest {
            source: remote(),
            cache: "s3://x".into(),
            ..Default::default()
        },
        // A hash-fixing stage of no run, or of something that is no run id.
        pb::SubmitRunRequest {
            source: remote(),
            stage_of: format!("r{}", "0".repeat(1 << 20)),
            ..Default::default()
        },
        pb::SubmitRunRequest {
            source: remote(),
            attrs: vec!["a".into()],
            skip_listing: true,
            stage_of: "r0123456789abcdef".into(),
            ..Default::default()
        },
        pb::SubmitRunRequest {
            source: remote(),
            cache: format!("https://c.example/{}", "x".repeat(1 << 20)),
            ..Default::default()
        },
        pb::SubmitRunRequest {
            source: Some(pb::Source {
                kind: Some(pb::source::Kind::FlakeRef(format!(
                    "github:o/{}",
                    "r".repeat(1 << 20)
                ))),
            }),
            ..Default::default()
        },
    ];
    for req in bad {
        let e = c.submit_run(req).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        assert!(
            e.message().len() < 400,
            "echoed: {} bytes",
            e.message().len()
        );
    }
    let e = c
        .submit_run(pb::SubmitRunRequest {
            source: remote(),
            cache: "s3://x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("unsupported cache URL"), "{e}");
    // A megabyte of run id is neither looked up nor echoed.
    let e = c
        .get_report(pb::GetReportRequest {
            run_id: "r".repeat(1 << 20),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().len() < 400,
        "echoed: {} bytes",
        e.message().len()
    );
    let out = cli(&url, &["runs"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // The CLI packs to the coordinator's limit, whatever it is, and says so before uploading.
    let limits = c
        .get_limits(pb::GetLimitsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(limits.snapshot_max_bytes, 1 << 20);
    let repo = flake(dir.path(), "big", "x", 0);
    std::fs::write(repo.join("blob"), vec![0u8; 2 << 20]).unwrap();
    let out = cli(&url, &["submit", repo.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out)
            .contains("more than the coordinator's limit of 1.0 MiB (largest: blob (2.0 MiB)"),
        "{}",
        stderr(&out)
    );
    let stored = std::fs::read_dir(state.join("sources")).unwrap().count();
    assert_eq!(stored, 0, "something was uploaded");
}

/// A checkout whose `flake.lock` locks an input on the agent's own disk (where its
/// credentials are, say): refused before Nix fetches it (it would copy it into the agent's
/// A repository's `nixConfig` is not taken, even on a host whose nix.conf says to accept it:
/// it would turn off pure evaluation (the probe then reads the agent's environment).
#[test]
fn a_flakes_nix_config_is_never_accepted() {
    let dir = scratch();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).unwrap();
    let host = Host::new(&dir.path().join("host"));
    let home = host.root.join("home").display().to_string();
    let _a = host
        .start_agent_with_env(
            "a",
            &coordinator.url,
            None,
            1,
            &[(
                "NIX_CONFIG",
                "substituters = \nexperimental-features = nix-command flakes\nbuild-users-group = \naccept-flake-config = true",
            )],
        )
        .unwrap();
    let repo = dir.path().join("configured");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(
        repo.join("flake.nix"),
        r#"{ nixConfig = { pure-eval = false; };
  outputs = { self }: { packages.x86_64-linux.probe = throw "home=[${builtins.getEnv "HOME"}]"; }; }"#,
    )
    .unwrap();
    let out = cli(&coordinator.url, &["submit", repo.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = stdout(&out).trim().to_string();
    let report = wait_terminal(&coordinator.url, &run, Duration::from_secs(120));
    let reason = report["packages"][0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("home=[]"), "{report}");
    assert!(!reason.contains(&home), "{report}");
}

/// store, readable to the evaluation, which could send it back in an error), and nothing of
/// it reaches the report.
#[test]
fn a_locked_input_on_the_agents_own_disk_is_refused() {
    let dir = scratch();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).unwrap();
    let host = Host::new(&dir.path().join("host"));
    let _a = host.start_agent("a", &coordinator.url, None, 1).unwrap();
    let secret = dir.path().join("credentials");
    std::fs::create_dir_all(&secret).unwrap();
    let token = format!("agent-secret-{}", std::process::id());
    std::fs::write(secret.join("token"), &token).unwrap();
    let repo = dir.path().join("leaky");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(
        repo.join("flake.nix"),
        format!(
            r#"{{ inputs.k = {{ url = "path:{}"; flake = false; }};
  outputs = {{ self, k }}: {{ packages.x86_64-linux.leak = throw (builtins.readFile "${{k}}/token"); }}; }}"#,
            secret.display()
        ),
    )
    .unwrap();
    // The maintainer's own Nix locks it, as it locks any input.
    let locked = std::process::Command::new("nix")
        .args(["--extra-experimental-features", "nix-command flakes"])
        .args(["flake", "lock"])
        .arg(format!("path:{}", repo.display()))
        .env("NIX_CONFIG", "substituters = \nbuild-users-group = ")
        .output()
        .unwrap();
    assert!(locked.status.success(), "{}", stderr(&locked));
    assert!(repo.join("flake.lock").is_file());
    let out = cli(&coordinator.url, &["submit", repo.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = stdout(&out).trim().to_string();
    let report = wait_terminal(&coordinator.url, &run, Duration::from_secs(120));
    let text = report.to_string();
    assert!(
        text.contains("flake.lock's input 'k'") && text.contains("path:"),
        "{text}"
    );
    assert!(!text.contains(&token), "{text}");

    // Not locked at all: Nix would fetch it to lock it, on the agent, before refusing to
    // write the lock. Refused first; the agent's store never holds it.
    std::fs::remove_file(repo.join("flake.lock")).unwrap();
    let out = cli(&coordinator.url, &["submit", repo.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = stdout(&out).trim().to_string();
    let text = wait_terminal(&coordinator.url, &run, Duration::from_secs(120)).to_string();
    assert!(
        text.contains("flake.nix's input 'k'") && text.contains("path:"),
        "{text}"
    );
    assert!(!text.contains(&token), "{text}");
    let copied = std::process::Command::new("grep")
        .args(["-rl", &token])
        .arg(host.root.join("nix/store"))
        .output()
        .unwrap();
    assert!(
        copied.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&copied.stdout)
    );
}

/// A repository's code reads a file of the agent's host through a fetcher pure evaluation
/// allows (`builtins.fetchTree { type = "path"; … rev = …; }`), and throws its text: the
/// agent's signing key, say. Evaluations run where the agent's secret files are empty.
#[test]
fn an_evaluation_cannot_read_the_agents_secret_files() {
    evaluations_cannot_read_secret_files(None);
}

/// The same for an agent without privileges (the shipped units run it so): its evaluations
/// run in a user namespace of their own.
#[test]
fn an_unprivileged_agents_evaluation_cannot_read_its_secret_files() {
    evaluations_cannot_read_secret_files(Some(65534));
}

fn evaluations_cannot_read_secret_files(user: Option<u32>) {
    let dir = scratch();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).unwrap();
    let (sk, _pk) = cache_key(dir.path(), "agent-key-1");
    let host = match user {
        None => Host::new(&dir.path().join("host")),
        Some(uid) => {
            std::os::unix::fs::chown(&sk, Some(uid), Some(uid)).unwrap();
            Host::unprivileged(&dir.path().join("host"), uid)
        }
    };
    // The agent's key is its own: readable by its user alone.
    std::fs::set_permissions(&sk, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    // The agent uses nothing in /home (this test's PATH may: a toolchain there is not the
    // agent's), so /home is covered whole for what it runs.
    let path: Vec<PathBuf> = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .filter(|p| !p.starts_with("/home"))
        .collect();
    let path = std::env::join_paths(path).unwrap();
    let a = host
        .start_agent_with_env(
            "a",
            &coordinator.url,
            Some(&sk),
            1,
            &[("PATH", path.to_str().unwrap())],
        )
        .unwrap();
    // One of the agent's threads: its own /proc entry, beside the process's.
    let agent_pid = wait_for(Duration::from_secs(30), "the agent's threads", || {
        std::fs::read_dir(format!("/proc/{}/task", a.child.id()))
            .ok()?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .find(|t| *t != a.child.id())
    });
    let key = std::fs::read_to_string(&sk).unwrap();
    let secret = key.trim().split_once(':').unwrap().1.to_string();
    let keys = dir.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    std::fs::copy(&sk, keys.join("key")).unwrap();
    std::fs::set_permissions(
        keys.join("key"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let repo = dir.path().join("reader");
    std::fs::create_dir_all(&repo).unwrap();
    // A user's file in /home, readable to anyone: the agent uses nothing there, so the
    // evaluation sees no /home at all. (Removed when the test ends.)
    let user_home = HomeDir::new(&format!(
        "nixfarm-test-{}-{}",
        std::process::id(),
        user.unwrap_or(0)
    ));
    let note = format!("users-note-{}", std::process::id());
    std::fs::write(user_home.0.join("note"), &note).unwrap();
    // The key file itself, and a directory holding a copy of it that is no secret of the
    // agent's (read as any file of the host would be).
    std::fs::write(
        repo.join("flake.nix"),
        format!(
            r#"{{ outputs = {{ self }}: let
      read = path: builtins.fetchTree {{ type = "path"; inherit path; rev = "0000000000000000000000000000000000000000"; }};
    in {{ packages.x86_64-linux = {{
      key = throw "key=[${{builtins.readFile (read "{sk}")}}]";
      viaproc = throw "viaproc=[${{builtins.readFile (read "/proc/{agent_pid}/root{sk}")}}]";
      other = throw "other=[${{builtins.readFile "${{read "{keys}"}}/key"}}]";
      home = throw "home=[${{builtins.readFile "${{read "{home}"}}/note"}}]";
      # Its main program, run by --smoke, prints the key file (straight, and through the
      # agent's /proc entry) and how many network interfaces it has, and fails: the report
      # shows what it printed.
      prog = derivation {{
        name = "prog"; system = "x86_64-linux"; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
        args = [ "-c" ''mkdir -p $out/bin; printf '#!/bin/sh\necho "prog=[$(cat {sk} /proc/{agent_pid}/root{sk})] net=$(grep -c : /proc/net/dev)"; exit 1\n' > $out/bin/prog; chmod +x $out/bin/prog'' ];
      }};
      # A build that prints the key file (straight, and through the agent's /proc entry)
      # and fails, so the report shows its log.
      peek = derivation {{
        name = "peek"; system = "x86_64-linux"; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
        args = [ "-c" ''echo "peek=[$(cat {sk} /proc/{agent_pid}/root{sk} 2>&1)]"; exit 1'' ];
      }};
    }}; }}; }}"#,
            sk = sk.display(),
            keys = keys.display(),
            home = user_home.0.display(),
            agent_pid = agent_pid
        ),
    )
    .unwrap();
    let out = cli(
        &coordinator.url,
        &["submit", "--smoke", repo.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let run = stdout(&out).trim().to_string();
    let report = wait_terminal(&coordinator.url, &run, Duration::from_secs(120));
    let package = |attr: &str| {
        report["packages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["attr"] == attr)
            .unwrap()
            .clone()
    };
    let prog = package("prog");
    // The built program ran, offline, and read nothing of the key either.
    assert_eq!(prog["smoke"], "failed", "{prog}");
    let said = prog["log_tail"].as_str().unwrap();
    assert!(said.contains("prog=[") && said.contains("net=1"), "{prog}");
    assert!(!said.contains(&secret), "{prog}");
    // An unprivileged agent's builds run as its user (no build users, no sandbox): they
    // get the same covers. A root agent's run as root here (these hosts have no build
    // users), which no cover confines.
    if user.is_some() {
        let peek = package("peek");
        let log = peek["log_tail"].as_str().unwrap();
        assert!(log.contains("peek=["), "{peek}");
        assert!(!log.contains(&secret), "{peek}");
    }
    let got: std::collections::BTreeMap<String, String> = report["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["attr"].as_str().unwrap().to_string(),
                p["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    // The evaluation ran, and read what a host's other files hold: the test reads what it
    // means to.
    assert!(got["other"].contains(&secret), "{got:?}");
    // The key file is /dev/null there, which Nix does not copy.
    assert!(!got["key"].contains(&secret), "{got:?}");
    // Nor around the cover, through the agent's own view of the file system.
    assert!(!got["viaproc"].contains(&secret), "{got:?}");
    assert!(got["key"].contains("cache.sk"), "{got:?}");
    assert!(!got["home"].contains(&note), "{got:?}");
    // The evaluation asked for it, and found nothing there.
    assert!(
        got["home"].contains(&user_home.0.display().to_string())
            && got["home"].contains("No such file or directory"),
        "{got:?}"
    );
}

/// A directory of the test's own under /home, readable to anyone, removed when dropped.
struct HomeDir(PathBuf);

impl HomeDir {
    fn new(name: &str) -> HomeDir {
        let p = Path::new("/home").join(name);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        HomeDir(p)
    }
}

impl Drop for HomeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An unprivileged agent where no /proc of its own can be mounted (a part of the host's is
/// covered, as systemd's ProtectKernelTunables= does) cannot isolate what it runs: it
/// refuses to start, naming the way out, unless its operator said to run anyway.
#[test]
fn an_agent_that_cannot_isolate_refuses_to_start_unless_told() {
    let dir = scratch();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    std::os::unix::fs::chown(&work, Some(65534), Some(65534)).unwrap();
    let anyway = dir.path().join("anyway.toml");
    std::fs::write(&anyway, "allow_unisolated_evaluation = true\n").unwrap();
    let agent = |config: Option<&Path>| {
        let mut c = std::process::Command::new("unshare");
        c.args(["-m", "--propagation", "private", "sh", "-c"])
            .arg("set -e; mount --bind /proc/sys /proc/sys; exec setpriv --reuid=65534 --regid=65534 --clear-groups -- \"$@\"")
            .arg("host")
            .arg(bin("nixfarm-agent"))
            // Nothing listens there: the agent tries until it is stopped.
            .args(["--coordinator", "http://127.0.0.1:9", "--name", "a", "--work-dir"])
            .arg(&work)
            .env("HOME", &work)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        if let Some(p) = config {
            c.arg("--config").arg(p);
        }
        c.spawn().unwrap()
    };
    let mut refusing = agent(None);
    let stopped = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        refusing.try_wait().unwrap().is_some()
    });
    if !stopped {
        refusing.kill().unwrap();
    }
    let refused = refusing.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(stopped, "the agent ran on: {err}");
    assert!(!refused.status.success(), "{err}");
    assert!(
        err.contains("cannot make a user namespace")
            && err.contains("allow_unisolated_evaluation = true"),
        "{err}"
    );
    // Told to: it runs, and says what that means.
    let mut running = agent(Some(&anyway));
    std::thread::sleep(Duration::from_secs(3));
    assert!(running.try_wait().unwrap().is_none(), "the agent stopped");
    running.kill().unwrap();
    let out = running.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("running anyway"), "{err}");
}

/// A coordinator config with a mistake is refused naming the key (and its table), in words
/// an operator knows, each cause said once and no backtrace, whatever RUST_BACKTRACE says.
#[test]
fn a_config_mistake_is_named_by_its_key() {
    let dir = scratch();
    for (text, want) in [
        (
            "[scheduler]\neval_chunk_size = \"16\"\n",
            "line 2: [scheduler] eval_chunk_size: invalid type: a string, expected a whole number, 0 or more",
        ),
        (
            "[auth]\nagent_token_file = \"/nonexistent/token\"\n",
            "[auth] agent_token_file: cannot read /nonexistent/token: No such file or directory (os error 2)",
        ),
    ] {
        let cfg = config_file(dir.path(), "c.toml", text);
        let out = std::process::Command::new(bin("nixfarm-coordinator"))
            .args(["--listen", "127.0.0.1:0", "--state-dir"])
            .arg(dir.path().join("state"))
            .arg("--config")
            .arg(&cfg)
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{text}");
        let err = stderr(&out);
        assert!(err.contains(want), "{err}");
        assert_eq!(
            err.matches("No such file").count(),
            want.matches("No such file").count(),
            "{err}"
        );
        assert!(
            !err.contains("backtrace") && !err.contains("Caused by"),
            "{err}"
        );
    }
}
