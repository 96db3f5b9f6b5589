//! What the first hour with nixfarm meets: logs a machine can read (JSON lines on request,
//! never colour codes in a file), and flags that do not apply refused rather than ignored.

use nixfarm_tests::*;
use std::os::unix::process::CommandExt as _;

#[test]
fn logs_are_plain_text_in_files_or_json_lines_on_request() {
    let dir = scratch();
    let text = Coordinator::start(&dir.path().join("text")).unwrap();
    let json = Coordinator::start_on(
        &dir.path().join("json"),
        "127.0.0.1:0",
        &["--log-format", "json"],
    )
    .unwrap();
    let log = wait_for(std::time::Duration::from_secs(10), "the logs", || {
        let t = text.proc.log_text();
        let j = json.proc.log_text();
        (t.contains("coordinator listening") && j.contains("coordinator listening"))
            .then_some((t, j))
    });
    assert!(
        !log.0.contains('\u{1b}'),
        "colour codes in a log file:\n{}",
        log.0
    );
    for line in log.1.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
    }
}

#[test]
fn local_refuses_flags_meant_for_another_coordinator() {
    for args in [
        vec!["--coordinator", "http://farm:7420", "local", "."],
        vec!["local", ".", "--token", "x"],
        vec!["local", ".", "--tls-ca", "/etc/ca.pem"],
    ] {
        let out = std::process::Command::new(bin("nixfarm"))
            .args(&args)
            .env_remove("NIXFARM_COORDINATOR")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(stderr(&out).contains("does not apply"), "{}", stderr(&out));
    }
    // The environment is not a flag: a user with NIXFARM_COORDINATOR set can still run local
    // (here it stops later, at the missing flake, not at the variable).
    let out = std::process::Command::new(bin("nixfarm"))
        .args(["local", "/definitely/not/here"])
        .env("NIXFARM_COORDINATOR", "http://farm:7420")
        .output()
        .unwrap();
    assert!(!stderr(&out).contains("does not apply"), "{}", stderr(&out));
}

/// `--format github` on the bundled example, as a GitHub workflow runs it: each package that
/// is not ready is annotated on the repository line that needs the change (the hash binding
/// for a missing hash, with the new value; the package's definition otherwise), the job
/// summary gets the Markdown report, and JUnit names the same file and line.
#[test]
fn ci_annotations_point_at_the_lines_to_change() {
    let dir = scratch();
    let repo = dir.path().join("repo");
    copy_tree(&example_repo(), &repo);
    let host = Host::new(&dir.path().join("host"));
    let summary = dir.path().join("step-summary.md");
    std::fs::write(&summary, "# earlier step\n").unwrap();
    let state = dir.path().join("state");
    let out = host
        .command(&[
            bin("nixfarm").to_str().unwrap(),
            "local",
            repo.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--format",
            "github",
        ])
        .env("GITHUB_STEP_SUMMARY", &summary)
        .env("GITHUB_ACTIONS", "true")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    // The runner reads workflow commands in the step's output, and build logs and errors
    // are a repository's text: commands are stopped from the start (stderr, where progress
    // goes) and resumed, with the same unguessable token, just before the annotations.
    let err = stderr(&out);
    let token = err
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("::stop-commands::"))
        .unwrap_or_else(|| panic!("commands are not stopped first:\n{err}"));
    assert_eq!(token.len(), 32, "{token}");
    let first_annotation = text
        .lines()
        .position(|l| l.contains("title=nixfarm"))
        .unwrap();
    let resumed = text
        .lines()
        .position(|l| l == format!("::{token}::"))
        .unwrap();
    assert!(resumed < first_annotation, "{text}");
    let expected = expected();
    let line_of = |file: &str, line: usize| -> String {
        std::fs::read_to_string(repo.join(file))
            .unwrap_or_else(|e| panic!("{file}: {e}\n{text}"))
            .lines()
            .nth(line - 1)
            .unwrap_or_default()
            .to_string()
    };
    let parse = |l: &str| -> (String, String, usize, String) {
        // ::LEVEL file=F,line=N,title=T::MESSAGE
        let (cmd, msg) = l[2..].split_once("::").unwrap();
        let (level, props) = cmd.split_once(' ').unwrap_or((cmd, ""));
        let mut file = String::new();
        let mut line = 0;
        for p in props.split(',') {
            if let Some(f) = p.strip_prefix("file=") {
                file = f.to_string();
            } else if let Some(n) = p.strip_prefix("line=") {
                line = n.parse().unwrap();
            }
        }
        (level.to_string(), file, line, msg.to_string())
    };
    for (attr, e) in expected.as_object().unwrap() {
        let title = format!("title=nixfarm%3A {attr} {}", e["status"].as_str().unwrap());
        let ours: Vec<&str> = text.lines().filter(|l| l.contains(&title)).collect();
        match e["status"].as_str().unwrap() {
            "ready" => assert!(ours.is_empty(), "{attr}: {ours:?}"),
            "needs-hash" => {
                assert!(!ours.is_empty(), "{attr} has no annotation:\n{text}");
                for l in ours {
                    let (level, file, line, msg) = parse(l);
                    assert_eq!(level, "error");
                    let src = line_of(&file, line);
                    // The annotated line is the binding, and the message has the new hash.
                    let attribute = msg.split_whitespace().next().unwrap();
                    assert!(
                        src.contains(attribute),
                        "{attr}: {file}:{line} is {src:?}: {msg}"
                    );
                    assert!(msg.contains("\"sha256-"), "{msg}");
                }
            }
            // Its derivation never evaluated, so Nix gave no position: annotated without a
            // file (GitHub shows it on the run's summary).
            "eval-failed" => {
                assert_eq!(ours.len(), 1, "{attr}:\n{text}");
                assert_eq!(parse(ours[0]).0, "error");
            }
            status => {
                assert_eq!(ours.len(), 1, "{attr} ({status}):\n{text}");
                let (level, file, line, _) = parse(ours[0]);
                assert_eq!(
                    level,
                    if status == "unpinned" {
                        "warning"
                    } else {
                        "error"
                    }
                );
                // The package's own definition: the line that names it.
                let src = line_of(&file, line);
                assert!(
                    file.starts_with("pkgs/") && src.contains("pname"),
                    "{attr}: {file}:{line} is {src:?}"
                );
            }
        }
    }
    assert!(
        text.lines()
            .last()
            .unwrap()
            .starts_with("::notice title=nixfarm readiness::Ready: 9/19")
    );
    let md = std::fs::read_to_string(&summary).unwrap();
    assert!(
        md.starts_with("# earlier step\n"),
        "appended, not overwritten"
    );
    assert!(
        md.contains("| package | status | reason |") && md.contains("`rsky`"),
        "{md}"
    );
}

/// `nixfarm local` (with `extra`, JSON report) of the bundled example in a host of its own
/// under `dir`, its state in `state`, started: stderr piped, stdout piped or not at all.
fn local_example(
    dir: &std::path::Path,
    state: &std::path::Path,
    extra: &[&str],
    stdout: bool,
) -> std::process::Child {
    let host = Host::new(&dir.join("host"));
    let mut argv = vec![
        bin("nixfarm").display().to_string(),
        "local".into(),
        example_repo().display().to_string(),
        "--state-dir".into(),
        state.display().to_string(),
        "--format".into(),
        "json".into(),
    ];
    argv.extend(extra.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    host.command(&argv)
        .stdout(if stdout {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stderr(std::process::Stdio::piped())
        // A process group of its own, as a shell gives a job: a terminal's Ctrl-C goes to
        // every process in it (Nix's too).
        .process_group(0)
        .spawn()
        .unwrap()
}

/// A reader of the progress that goes away (a closed pipe, as `2>&1 | head` or a log
/// collector that died leave) stops neither the run nor its report: `nixfarm local
/// --fix-hashes` runs to its end and prints the whole JSON report on stdout, with the exit
/// code it would have had. It panicked before, and a follower that panicked left it waiting
/// for ever.
#[test]
fn a_closed_stderr_stops_neither_the_run_nor_its_report() {
    use std::io::Read;
    let dir = scratch();
    let state = dir.path().join("state");
    let mut child = local_example(dir.path(), &state, &["--fix-hashes"], true);
    // The first bytes of progress are read, then the reader goes.
    let mut first = [0u8; 16];
    child.stderr.take().unwrap().read_exact(&mut first).unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).map(|_| s)
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("nixfarm local did not end within 120 s once its stderr was closed");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let out = reader.join().unwrap().unwrap();
    assert_eq!(status.code(), Some(0), "{out}");
    let report: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
    let got = packages_by_attr(&report);
    for (attr, e) in expected().as_object().unwrap() {
        let status = if e.get("fixes").is_some() {
            "ready"
        } else {
            e["status"].as_str().unwrap()
        };
        assert_eq!(
            got[attr]["status"], status,
            "{attr}: {}",
            got[attr]["reason"]
        );
    }
}

/// Two coordinators on one state directory would each hand out the other's runs to their own
/// agents and settle them with answers about another store (two `nixfarm local` in two
/// terminals share the default one): the second refuses to start, naming the first, and so
/// does a `nixfarm local` given the same --state-dir. Once the first is gone the state is the
/// next one's, however it ended (`kill -9` here).
#[test]
fn a_state_directory_serves_one_coordinator_at_a_time() {
    let dir = scratch();
    let state = dir.path().join("state");
    let first = Coordinator::start(&state).unwrap();
    let e = Coordinator::start(&state)
        .err()
        .expect("a second coordinator on the same state directory")
        .to_string();
    assert!(
        e.contains("is in use by another coordinator (process "),
        "{e}"
    );
    let host = Host::new(&dir.path().join("host"));
    let out = host.run(&[
        bin("nixfarm").to_str().unwrap(),
        "local",
        example_repo().to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("another nixfarm local is running with its state in"),
        "{}",
        stderr(&out)
    );
    drop(first);
    Coordinator::start(&state).unwrap();
}

/// What a command prints on stdout either gets there or the command fails: a listing sent
/// to a full disk (`/dev/full`) exits 2 saying why, where it used to panic; one whose
/// reader goes away (`| head`) ends quietly.
#[test]
fn stdout_that_cannot_be_written_fails_the_command_a_reader_gone_does_not() {
    let dir = scratch();
    let coordinator = Coordinator::start(&dir.path().join("state")).unwrap();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let out = std::process::Command::new(bin("nixfarm"))
        .args(["--coordinator", &coordinator.url, "runs"])
        .stdout(full)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("error: cannot write to stdout: No space left on device"),
        "{}",
        stderr(&out)
    );
    // A pipe whose reader is gone before anything is written.
    let mut child = std::process::Command::new(bin("nixfarm"))
        .args(["--coordinator", &coordinator.url, "runs"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}

/// Ctrl-C stops `nixfarm local`, farm and all: its unfinished runs are cancelled (their
/// builds stopped, relay's 3 s of silence not waited for), not left for the next `nixfarm
/// local` of the same state to take up unasked; it says so and exits 130.
#[test]
fn ctrl_c_stops_a_local_farm_and_cancels_its_runs() {
    let (said, states) = ctrl_c_in_local_once(|line| line.starts_with("building "));
    assert!(said.contains("unfinished run(s)"), "{said}");
    assert_eq!(states, ["cancelled"], "{said}");
}

/// The same before any run is followed (the farm starting; the snapshot just up, its run
/// being submitted): the command stops as asked, with its farm, rather than being killed
/// outright and leaving a run it submitted for the next `nixfarm local` of the state to
/// take up.
#[test]
fn ctrl_c_before_the_run_is_followed_stops_the_local_farm_too() {
    for at in ["local agent(s)", "uploaded "] {
        let (said, states) = ctrl_c_in_local_once(|line| line.contains(at));
        assert!(
            states.iter().all(|s| s == "cancelled"),
            "{at}: {states:?}: {said}"
        );
    }
}

/// Runs `nixfarm local` on the example and presses Ctrl-C once it says a line `at` picks:
/// what it said, and the states of the runs its state then holds. It must have exited 130
/// with its own words for it.
fn ctrl_c_in_local_once(at: impl Fn(&str) -> bool) -> (String, Vec<String>) {
    use std::io::BufRead;
    let dir = scratch();
    let state = dir.path().join("state");
    let mut child = local_example(dir.path(), &state, &[], false);
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut said = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let now = at(&line);
        said.push(line);
        if now {
            break;
        }
    }
    // As a terminal sends it: to the whole job, the agents' Nix processes too.
    let group = format!("-{}", child.id());
    assert!(
        std::process::Command::new("kill")
            .args(["-INT", "--", &group])
            .status()
            .unwrap()
            .success()
    );
    said.extend(lines.map_while(Result::ok));
    let status = child.wait().unwrap();
    let said = said.join("\n");
    assert_eq!(status.code(), Some(130), "{status:?}: {said}");
    assert_eq!(
        said.matches("interrupted: the local farm stops with this command")
            .count(),
        1,
        "{said}"
    );
    let db = rusqlite::Connection::open_with_flags(
        state.join("coordinator.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let states: Vec<String> = db
        .prepare("SELECT state FROM runs")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    (said, states)
}

/// A patch file that cannot be written (`--patch-out` into a directory that does not exist)
/// is said before anything is submitted, not after the whole fixing session.
#[test]
fn an_unwritable_patch_file_is_refused_before_the_run() {
    let dir = scratch();
    let state = dir.path().join("state");
    let child = local_example(
        dir.path(),
        &state,
        &["--patch-out", "/nonexistent/dir/fix.patch"],
        false,
    );
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("cannot write the patch to /nonexistent/dir/fix.patch (--patch-out)"),
        "{err}"
    );
    assert!(!err.contains("submitted run"), "{err}");
}

/// A daemon whose log reader goes away (a log shipper restarting, `2>&1 | head`) goes on:
/// the coordinator and an agent, their stderr a pipe closed from the start, still serve a
/// run. Each used to panic on its next log line ("failed printing to stderr") and exit 101.
#[test]
fn daemons_outlive_the_reader_of_their_logs() {
    use std::io::BufRead as _;
    let dir = scratch();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let closed = || {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        writer
    };
    let mut coordinator = std::process::Command::new(bin("nixfarm-coordinator"))
        .args(["--listen", "127.0.0.1:0", "--state-dir"])
        .arg(&state)
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(closed())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(coordinator.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = format!(
        "http://{}",
        line.trim().strip_prefix("listening on ").unwrap()
    );
    let host = Host::new(&dir.path().join("host"));
    let mut agent = host
        .command(&[
            bin("nixfarm-agent").to_str().unwrap(),
            "--coordinator",
            &url,
            "--name",
            "quiet",
            "--work-dir",
            dir.path().join("work").to_str().unwrap(),
        ])
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(closed())
        .spawn()
        .unwrap();
    let repo = sh_flake(dir.path(), "one", r#"one = mk "one" "echo one > $out";"#);
    let out = host.run(&[
        bin("nixfarm").to_str().unwrap(),
        "--coordinator",
        &url,
        "submit",
        repo.to_str().unwrap(),
        "--watch",
        "--format",
        "json",
    ]);
    let alive = |c: &mut std::process::Child| c.try_wait().unwrap().is_none();
    let (coordinator_alive, agent_alive) = (alive(&mut coordinator), alive(&mut agent));
    let _ = coordinator.kill();
    let _ = agent.kill();
    assert!(
        coordinator_alive,
        "the coordinator exited: {:?}",
        coordinator.wait()
    );
    assert!(agent_alive, "the agent exited: {:?}", agent.wait());
    let report: serde_json::Value = serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stderr(&out)));
    assert_eq!(
        packages_by_attr(&report)["one"]["status"],
        "ready",
        "{report}"
    );
}

/// `nixfarm submit . --fail-under 90` in CI gates on the run: what shapes or checks the
/// report implies --watch. It printed the run id and passed, whatever the run came to.
#[test]
fn a_report_option_makes_submit_wait_for_the_report() {
    let dir = scratch();
    let coordinator = Coordinator::start(&dir.path().join("state")).unwrap();
    let host = Host::new(&dir.path().join("host"));
    let _agent = host.start_agent("a1", &coordinator.url, None, 2).unwrap();
    let repo = sh_flake(
        dir.path(),
        "gate",
        r#"good = mk "good" "echo > $out";
        bad = mk "bad" "exit 1";"#,
    );
    let submit = |extra: &[&str]| {
        let mut argv = vec![
            bin("nixfarm").to_str().unwrap().to_string(),
            "--coordinator".into(),
            coordinator.url.clone(),
            "submit".into(),
            repo.to_str().unwrap().to_string(),
        ];
        argv.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        host.run(&refs)
    };
    let gated = submit(&["--fail-under", "90"]);
    assert_eq!(gated.status.code(), Some(1), "{}", stderr(&gated));
    assert!(stdout(&gated).contains("Ready: 1/2"), "{}", stdout(&gated));
    let json = submit(&["--format", "json"]);
    let report: serde_json::Value = serde_json::from_str(&stdout(&json))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(&json)));
    assert_eq!(packages_by_attr(&report)["bad"]["status"], "build-failed");
    // A cache nixfarm cannot push to is refused before the snapshot goes up.
    let s3 = submit(&["--cache", "s3://bucket"]);
    assert_eq!(s3.status.code(), Some(2), "{}", stderr(&s3));
    assert!(
        stderr(&s3).contains("unsupported cache URL") && !stderr(&s3).contains("uploaded"),
        "{}",
        stderr(&s3)
    );
    // One that does not answer from here is said at once (every build's push would wait
    // out its retries on it), and the run goes (the agents may reach it).
    let down = submit(&["--cache", "http://127.0.0.1:1/cache"]);
    assert_eq!(down.status.code(), Some(0), "{}", stderr(&down));
    assert!(
        stderr(&down)
            .contains("warning: the cache http://127.0.0.1:1/cache does not answer from here"),
        "{}",
        stderr(&down)
    );
    let cancel = host.run(&[
        bin("nixfarm").to_str().unwrap(),
        "--coordinator",
        &coordinator.url,
        "cancel",
        stdout(&down).trim(),
    ]);
    assert!(cancel.status.success(), "{}", stderr(&cancel));
    // Without any, the run id, at once.
    let plain = submit(&[]);
    assert_eq!(plain.status.code(), Some(0), "{}", stderr(&plain));
    assert!(
        nixfarm_core::limits::is_run_id(stdout(&plain).trim()),
        "{}",
        stdout(&plain)
    );
}

/// The CLI's own inputs, as a shell user gives them: an empty variable is unset, a config
/// piped in (`--config <(pass show farm)`) is read, a file that is no certificate is named
/// as such, and a cause is said once.
#[test]
fn cli_inputs_are_taken_as_a_shell_user_means_them() {
    let dir = scratch();
    let nixfarm = |args: &[&str], env: &[(&str, &str)], stdin: &str| {
        use std::io::Write as _;
        let mut c = std::process::Command::new(bin("nixfarm"))
            .args(args)
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        c.wait_with_output().unwrap()
    };
    let unreachable = "cannot reach the coordinator at http://127.0.0.1:1";
    let empty = nixfarm(
        &["--coordinator", "http://127.0.0.1:1", "runs"],
        &[("NIXFARM_CONFIG", ""), ("NIXFARM_TOKEN", "")],
        "",
    );
    assert!(stderr(&empty).contains(unreachable), "{}", stderr(&empty));
    let piped = nixfarm(
        &["--config", "/dev/stdin", "runs"],
        &[],
        "coordinator = \"http://127.0.0.1:1\"\n",
    );
    assert!(stderr(&piped).contains(unreachable), "{}", stderr(&piped));
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    let https = ["--coordinator", "https://127.0.0.1:1", "--tls-ca"];
    let bad_ca = nixfarm(
        &[&https[..], &[not_pem.to_str().unwrap(), "runs"]].concat(),
        &[],
        "",
    );
    assert!(
        stderr(&bad_ca).contains("holds no PEM CERTIFICATE"),
        "{}",
        stderr(&bad_ca)
    );
    let missing = nixfarm(
        &[&https[..], &["/nonexistent/ca.pem", "runs"]].concat(),
        &[],
        "",
    );
    assert_eq!(
        stderr(&missing)
            .matches("No such file or directory")
            .count(),
        1,
        "{}",
        stderr(&missing)
    );
    let config = dir.path().join("cli.toml");
    std::fs::write(&config, "token_file = \"/nonexistent/token\"\n").unwrap();
    let token = nixfarm(&["--config", config.to_str().unwrap(), "runs"], &[], "");
    assert!(
        stderr(&token).contains("cannot read the token_file of the CLI config"),
        "{}",
        stderr(&token)
    );
}
