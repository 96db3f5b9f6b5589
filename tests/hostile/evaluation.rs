//! Hostile evaluation: with `cross_check_evaluation`, an agent that lies about what a
//! package evaluates to fails the run instead of having the farm build what it chose.

use super::*;

/// A derivation path for `hi` that is not what the repository evaluates to.
const FORGED_DRV: &str = "/nix/store/m5qmzvxz5afq05h5cqj8d7ph5hv32nrk-hi.drv";

/// Submits a repository of the one package `hi`; returns the run's id.
fn submit_hi(dir: &Path, url: &str) -> String {
    let repo = flake(dir, "hi", "hi", 0);
    let out = cli(url, &["submit", repo.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    stdout(&out).trim().to_string()
}

/// A fake agent's own derivation for `hi`, said to be in the cache already or not.
fn forged_hi(present: bool) -> pb::DrvNode {
    pb::DrvNode {
        drv_path: FORGED_DRV.into(),
        system: "x86_64-linux".into(),
        outputs: vec![pb::DrvOutput {
            name: "out".into(),
            path: "/nix/store/8v9s2bfgfgbv8q1kzlnl0gchbrzq046c-hi".into(),
            ..Default::default()
        }],
        present,
        ..Default::default()
    }
}

const CROSS_CHECKED: &str =
    "[scheduler]\ncross_check_evaluation = true\nlease_secs = 4\nheartbeat_secs = 1\n";

/// A fake agent takes the listing and answers it with a derivation of its own choosing for
/// the package. A real agent is asked the same (the fake may not check itself), evaluates
/// the repository for real, and disagrees: the run fails naming both agents and the
/// package, and nothing is built.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_lying_about_a_derivation_fails_the_run_when_evaluation_is_cross_checked() {
    let dir = scratch();
    let coordinator = Coordinator::start_with_config(dir.path(), CROSS_CHECKED).unwrap();
    let url = coordinator.url.clone();

    let mut liar = FakeAgent::register(&url, "liar", "x86_64-linux").await;
    let run = submit_hi(dir.path(), &url);
    // Its own derivation for `hi` (which it would then build, push and sign).
    liar.answer_listing("hi", forged_hi(false)).await;
    // Still connected (it would take the check if it could), with a real agent beside it.
    let host = Host::new(&dir.path().join("host"));
    let _real = host.start_agent("honest", &url, None, 1).unwrap();
    let keep_alive = liar.keep_alive();
    let r = wait_terminal_async(&url, &run).await;
    keep_alive.abort();
    assert_eq!(r["state"], "failed", "{r}");
    let error = r["error"].as_str().unwrap();
    assert!(
        error.contains("agents liar and honest evaluated the attribute listing differently")
            && error.contains(&format!(
                "attribute 'hi': agent liar says {FORGED_DRV}, agent honest says /nix/store/"
            )),
        "{error}"
    );
    assert!(r["packages"].as_array().unwrap().is_empty(), "{r}");
    // Whoever watched the run was told what it waited for, and why it failed.
    let url2 = url.clone();
    let run2 = run.clone();
    let watched = tokio::task::spawn_blocking(move || cli(&url2, &["watch", &run2]))
        .await
        .unwrap();
    let text = format!("{}{}", stdout(&watched), stderr(&watched));
    assert!(
        text.contains("the listing answered by liar; waiting for another agent to check it")
            && text.contains("run failed: agents liar and honest"),
        "{text}"
    );
    // The liar was never handed anything after its answer: no check of itself, no build.
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), liar.from.message())
        .await
        .map(|m| m.ok().flatten())
    {
        assert!(
            !matches!(m.msg, Some(pb::coordinator_message::Msg::Assign(_))),
            "the liar was given {m:?}"
        );
    }
}

/// Two honest agents on separate stores (each with its own checkout of the snapshot) agree:
/// the run builds and ends ready, both having listed it and both having evaluated its one
/// evaluation task (the listing evaluates nothing itself here, as in a larger repository).
#[test]
fn honest_agents_agree_and_the_run_builds() {
    let dir = scratch();
    let config = format!("{CROSS_CHECKED}list_eval_max = 0\n");
    let coordinator = Coordinator::start_with_config(dir.path(), &config).unwrap();
    let url = coordinator.url.clone();
    let (h1, h2) = (
        Host::new(&dir.path().join("h1")),
        Host::new(&dir.path().join("h2")),
    );
    let run = submit_hi(dir.path(), &url);
    let a1 = h1.start_agent("one", &url, None, 1).unwrap();
    let a2 = h2.start_agent("two", &url, None, 1).unwrap();
    let r = wait_terminal(&url, &run, Duration::from_secs(120));
    assert_eq!(r["state"], "finished", "{r}");
    assert_eq!(r["packages"][0]["status"], "ready", "{r}");
    drop((a1, a2));
    // Each task answered twice: the first answer, and the check by the other agent.
    let db = rusqlite::Connection::open(coordinator.state_dir.join("coordinator.sqlite")).unwrap();
    for kind in ["eval-list", "eval-chunk"] {
        let mut by: Vec<String> = db
            .prepare(
                "SELECT agent FROM attempts WHERE run_id = ?1 AND kind = ?2 AND state = 'done'",
            )
            .unwrap()
            .query_map([&run, kind], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        by.sort();
        assert_eq!(by, ["one", "two"], "{kind}");
    }
}

/// An agent says the package's output is in the cache already, in a run that did not ask
/// to skip cached outputs (no cross-check): it is built anyway, not reported ready unbuilt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_saying_an_output_is_cached_does_not_make_it_ready() {
    let dir = scratch();
    let coordinator = Coordinator::start(dir.path()).unwrap();
    let url = coordinator.url.clone();
    let mut liar = FakeAgent::register(&url, "liar", "x86_64-linux").await;
    let run = submit_hi(dir.path(), &url);
    liar.answer_listing("hi", forged_hi(true)).await;
    // The build is handed out (to the only agent there is), and the package is not ready.
    let a = tokio::time::timeout(Duration::from_secs(30), liar.assignment())
        .await
        .expect("a build to be handed out");
    assert!(
        matches!(&a.job, Some(pb::assignment::Job::Build(b)) if b.drv_path == FORGED_DRV),
        "{a:?}"
    );
    let r = tokio::task::spawn_blocking(move || report_json(&url, &run))
        .await
        .unwrap();
    assert_ne!(r["packages"][0]["status"], "ready", "{r}");
    assert_ne!(r["state"], "finished", "{r}");
}

/// With `[auth] agent_tokens_file`, a token admits one agent name: registering or claiming
/// uploads under another is refused, while the agent it names builds through the farm cache
/// as with the join token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_agent_token_admits_its_own_name_only() {
    let dir = scratch();
    let tokens = dir.path().join("agent-tokens");
    let one = "one-0123456789abcdef";
    std::fs::write(
        &tokens,
        format!("# name token\none {one}\ntwo two-0123456789abcdef\n"),
    )
    .unwrap();
    let coordinator = Coordinator::start_with_config(
        dir.path(),
        &format!("[auth]\nagent_tokens_file = \"{}\"\n", tokens.display()),
    )
    .unwrap();
    let url = coordinator.url.clone();
    let channel = Channel::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {one}").parse().unwrap();
    let mut as_one =
        AgentServiceClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", bearer.clone());
            Ok(r)
        });
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::AgentMessage>(8);
    tx.send(register_message("two", "x86_64-linux"))
        .await
        .unwrap();
    let e = as_one
        .connect_agent(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(
        e.message()
            .contains("agent 'one''s: it cannot act as 'two'"),
        "{e}"
    );
    let e = as_one
        .claim_uploads(pb::ClaimUploadsRequest {
            agent: "two".into(),
            cache: "file:///tmp/c".into(),
            paths: vec!["/nix/store/zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-x".into()],
            release: false,
            session_key: String::new(),
            attempt: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    // No token at all: refused as before.
    let e = agent_client(&url)
        .await
        .claim_uploads(pb::ClaimUploadsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");

    // The real agent under its own name builds, and pushes to the farm cache with its token.
    let token_file = dir.path().join("one.token");
    std::fs::write(&token_file, one).unwrap();
    let host = Host::new(&dir.path().join("host"));
    let _agent = host
        .start_agent_with(
            "one",
            &url,
            None,
            1,
            &[],
            &["--token-file", token_file.to_str().unwrap()],
        )
        .unwrap();
    let work = dir.path().to_path_buf();
    let url2 = url.clone();
    let r = tokio::task::spawn_blocking(move || {
        let run = submit_hi(&work, &url2);
        wait_terminal(&url2, &run, Duration::from_secs(120))
    })
    .await
    .unwrap();
    assert_eq!(r["packages"][0]["status"], "ready", "{r}");
}

/// Opens an agent stream presenting `token` and registers `name`: its stream, or the refusal.
async fn register_with_token(
    url: &str,
    token: &str,
    name: &str,
) -> Result<tonic::Streaming<pb::CoordinatorMessage>, tonic::Status> {
    let channel = Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    let mut client =
        AgentServiceClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", bearer.clone());
            Ok(r)
        });
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::AgentMessage>(8);
    tx.send(register_message(name, "x86_64-linux"))
        .await
        .unwrap();
    let mut from = client
        .connect_agent(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    // Registered; the sender lives as long as the stream (a task holds it).
    let first = from.message().await?;
    assert!(
        matches!(
            first.and_then(|m| m.msg),
            Some(pb::coordinator_message::Msg::Registered(_))
        ),
        "not registered"
    );
    tokio::spawn(async move {
        tx.closed().await;
    });
    Ok(from)
}

/// An agent's named token is replaced in `[auth] agent_tokens_file` (its host was
/// compromised): without a restart the agent on the old token is cut off and cannot come
/// back with it; the new token registers, and the other agents go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_token_taken_back_cuts_its_agent_off_without_a_restart() {
    let dir = scratch();
    let tokens = dir.path().join("agent-tokens");
    let (old, new, two) = (
        "one-0123456789abcdef",
        "one-fedcba9876543210",
        "two-0123456789abcdef",
    );
    std::fs::write(&tokens, format!("one {old}\ntwo {two}\n")).unwrap();
    let coordinator = Coordinator::start_with_config(
        dir.path(),
        &format!("[auth]\nagent_tokens_file = \"{}\"\n", tokens.display()),
    )
    .unwrap();
    let url = coordinator.url.clone();
    let mut one = register_with_token(&url, old, "one").await.unwrap();
    let mut other = register_with_token(&url, two, "two").await.unwrap();

    // A broken edit changes nothing.
    std::fs::write(&tokens, "one\n").unwrap();
    let still = tokio::time::timeout(Duration::from_secs(2), one.message()).await;
    assert!(still.is_err(), "cut off by a broken edit: {still:?}");

    std::fs::write(&tokens, format!("one {new}\ntwo {two}\n")).unwrap();
    cut_off_saying(&mut one, "taken back").await;
    let e = register_with_token(&url, old, "one").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    register_with_token(&url, new, "one")
        .await
        .expect("the new token registers");
    let going = tokio::time::timeout(Duration::from_millis(500), other.message()).await;
    assert!(going.is_err(), "agent two was cut off too: {going:?}");
    // Every line taken out: no named token admits anyone.
    std::fs::write(&tokens, "# nobody for now\n").unwrap();
    cut_off_saying(&mut other, "taken back").await;
    let log = coordinator.proc.log_text();
    assert!(
        !log.contains(old) && !log.contains(new),
        "a token was logged"
    );
}

/// The join token is replaced in `[auth] agent_token_file` (it leaked): without a restart
/// the agents admitted by the old one are cut off and cannot come back with it; the new
/// one admits. An empty file (one being written) changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_replaced_cuts_off_its_agents_without_a_restart() {
    let dir = scratch();
    let file = dir.path().join("join-token");
    let (old, new) = ("join-0123456789abcdef", "join-fedcba9876543210");
    std::fs::write(&file, format!("{old}\n")).unwrap();
    let coordinator = Coordinator::start_with_config(
        dir.path(),
        &format!("[auth]\nagent_token_file = \"{}\"\n", file.display()),
    )
    .unwrap();
    let url = coordinator.url.clone();
    let mut a = register_with_token(&url, old, "a").await.unwrap();
    std::fs::write(&file, "").unwrap();
    let still = tokio::time::timeout(Duration::from_secs(2), a.message()).await;
    assert!(still.is_err(), "cut off by an empty file: {still:?}");
    std::fs::write(&file, format!("{new}\n")).unwrap();
    cut_off_saying(&mut a, "join token").await;
    let e = register_with_token(&url, old, "a").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    register_with_token(&url, new, "a")
        .await
        .expect("the new join token registers");
    let log = coordinator.proc.log_text();
    assert!(
        !log.contains(old) && !log.contains(new),
        "a token was logged"
    );
}
