//! The web UI in a real browser (headless Chromium over WebDriver): log in with the client
//! token, watch a run's page fill in and turn live without a reload, filter it, open a
//! package's log, download the patch and check `git apply` takes it, see the agents. Also
//! the API (the same report as the CLI), the badge, and that nothing is served without the
//! token. Screenshots go to target/test-artifacts/.

#[path = "webdriver.rs"]
mod webdriver;

use nixfarm_tests::*;
use serde_json::json;
use std::io::{Read, Write};
use std::time::Duration;
use webdriver::Browser;

const TOKEN: &str = "web-client-secret-1";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP GET from 127.0.0.1: (status, headers and body as text).
fn get(port: u16, path: &str, bearer: Option<&str>) -> (u16, String) {
    get_from("127.0.0.1", port, path, bearer)
}

fn body(resp: &str) -> &str {
    resp.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

fn cli_env(url: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin("nixfarm"))
        .arg("--coordinator")
        .arg(url)
        .args(args)
        .env("NIXFARM_TOKEN", TOKEN)
        .output()
        .unwrap()
}

fn artifacts() -> std::path::PathBuf {
    repo_root().join("target/test-artifacts")
}

/// A coordinator in `dir` whose web UI (on the port returned) needs `TOKEN`.
fn with_token(dir: &std::path::Path) -> (Coordinator, u16) {
    with_token_and(dir, "")
}

/// The same, with `http` added to its `[http]` section.
fn with_token_and(dir: &std::path::Path, http_extra: &str) -> (Coordinator, u16) {
    let token_file = dir.join("client-token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let http = free_port();
    let config = dir.join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            "[auth]\nclient_token_file = \"{}\"\n[http]\nlisten = \"127.0.0.1:{http}\"\n{http_extra}",
            token_file.display()
        ),
    )
    .unwrap();
    let coordinator = Coordinator::start_on(
        &dir.join("coordinator"),
        "127.0.0.1:0",
        &["--config", config.to_str().unwrap()],
    )
    .unwrap();
    (coordinator, http)
}

/// A plain HTTP GET from `from` (a loopback address of this machine): (status, response).
fn get_from(from: &str, port: u16, path: &str, bearer: Option<&str>) -> (u16, String) {
    get_with(from, port, path, bearer, "")
}

/// The same with `headers` (each line ending in CRLF) added to the request.
fn get_with(
    from: &str,
    port: u16,
    path: &str,
    bearer: Option<&str>,
    headers: &str,
) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{from}:0").parse().unwrap()).unwrap();
        let mut s = sock
            .connect(format!("127.0.0.1:{port}").parse().unwrap())
            .await
            .unwrap();
        let auth = bearer
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n{auth}{headers}\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, out)
    })
}

/// The CLI pointed at the web UI's port (an easy mix-up: both are the coordinator's) says
/// that is not the address it wants; at an address that takes the connection and never
/// answers it gives up within its 10 s, saying so, rather than waiting for ever.
#[test]
fn the_cli_at_the_wrong_address_says_so_and_waits_a_bounded_time() {
    let dir = scratch();
    let (coordinator, http) = with_token(dir.path());
    let out = cli_env(&format!("http://127.0.0.1:{http}"), &["runs"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("does not answer as a nixfarm coordinator") && err.contains("web UI"),
        "{err}"
    );
    // The right one still answers.
    let out = cli_env(&coordinator.url, &["runs"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let held = std::thread::spawn(move || {
        // Connections accepted and held open, never answered.
        let mut held = Vec::new();
        for c in silent.incoming().take(4) {
            held.push(c);
        }
        held
    });
    let started = std::time::Instant::now();
    let out = cli_env(&url, &["runs"]);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("gave no answer within 10 s"),
        "{}",
        stderr(&out)
    );
    drop(held);
}

/// Guessing the token is bounded per address: after 10 wrong tokens an address gets 429
/// with Retry-After (the right token too, until its minute ends); another address is not
/// held back. The real coordinator, real TCP from two loopback addresses.
#[test]
fn wrong_tokens_hold_back_their_address_and_no_other() {
    let dir = scratch();
    let (_coordinator, http) = with_token(dir.path());
    assert_eq!(get_from("127.0.0.2", http, "/api/runs", Some(TOKEN)).0, 200);
    for i in 0..10 {
        let (status, resp) = get_from("127.0.0.2", http, "/api/runs", Some(&format!("guess-{i}")));
        assert_eq!(status, 401, "guess {i}: {resp}");
    }
    let (status, resp) = get_from("127.0.0.2", http, "/api/runs", Some(TOKEN));
    assert_eq!(status, 429, "{resp}");
    assert!(resp.to_lowercase().contains("retry-after: "), "{resp}");
    assert!(body(&resp).contains("too many wrong tokens"), "{resp}");
    assert!(!resp.contains(TOKEN), "{resp}");
    // The login form is held back as well; another address is not.
    let (status, _) = get_from("127.0.0.2", http, "/runs", Some("guess"));
    assert_eq!(status, 429);
    assert_eq!(get_from("127.0.0.3", http, "/api/runs", Some(TOKEN)).0, 200);
    // A browser's cookie of an earlier token is dropped on the way to the login form, so
    // reloading does not count as guessing.
    let (status, resp) = get(http, "/runs", None);
    assert_eq!(status, 303, "{resp}");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", http)).unwrap();
    write!(
        s,
        "GET /runs HTTP/1.0\r\nHost: 127.0.0.1:{http}\r\nCookie: nixfarm_session=stale\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.contains("location: /login?next="), "{resp}");
    assert!(resp.contains("nixfarm_session=; Path=/"), "{resp}");
    assert!(resp.contains("Max-Age=0"), "{resp}");
}

/// A client token replaced in its file is taken without a restart: within seconds the old
/// one is refused and the new one admitted, by the CLI's gRPC services and the web UI alike,
/// and a browser's cookie of the old one no longer opens pages.
#[test]
fn a_client_token_replaced_in_its_file_is_taken_without_a_restart() {
    let dir = scratch();
    let (coordinator, http) = with_token(dir.path());
    let runs = |token: &str| {
        std::process::Command::new(bin("nixfarm"))
            .args(["--coordinator", &coordinator.url, "runs"])
            .env("NIXFARM_TOKEN", token)
            .output()
            .unwrap()
    };
    assert!(runs(TOKEN).status.success());
    // A browser that logged in with the old token.
    let old_cookie = login_cookie(http, TOKEN);
    let (status, resp) = get_with(
        "127.0.0.1",
        http,
        "/runs",
        None,
        &format!("Cookie: nixfarm_session={old_cookie}\r\n"),
    );
    assert_eq!(status, 200, "{resp}");
    // A run (no agent: it waits), followed by `nixfarm watch` and by a page's event stream,
    // both admitted under the old token.
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(
        repo.join("flake.nix"),
        r#"{ outputs = { self }: { packages.x86_64-linux = { }; }; }"#,
    )
    .unwrap();
    let out = cli_env(&coordinator.url, &["submit", repo.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = stdout(&out).trim().to_string();
    let mut watch = std::process::Command::new(bin("nixfarm"))
        .args(["--coordinator", &coordinator.url, "watch", &run])
        .env("NIXFARM_TOKEN", TOKEN)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let follow = |what: &str| {
        std::process::Command::new("curl")
            .args(["-sN", "-H", &format!("Authorization: Bearer {TOKEN}")])
            .arg(format!("http://127.0.0.1:{http}/api/runs/{run}/{what}"))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (mut page, mut rows) = (follow("events"), follow("live"));
    std::thread::sleep(Duration::from_millis(1500));
    for p in [&mut watch, &mut page, &mut rows] {
        assert!(p.try_wait().unwrap().is_none(), "a stream ended early");
    }
    let new = "the-replacement-client-token";
    std::fs::write(dir.path().join("client-token"), format!("{new}\n")).unwrap();
    // Polled with the old token (a wrong one counts against the address, as a guess).
    let old = wait_for(
        Duration::from_secs(20),
        "the old client token to be refused",
        || {
            let out = runs(TOKEN);
            (!out.status.success()).then_some(out)
        },
    );
    assert!(runs(new).status.success());
    // Written under the usual umask, the new file is 0644: said at its reading, as the
    // first one was at start-up.
    let open = coordinator
        .proc
        .log_text()
        .matches("readable by every user of this host")
        .count();
    assert!(open >= 2, "{}", coordinator.proc.log_text());
    assert!(
        String::from_utf8_lossy(&old.stderr).contains("token"),
        "{}",
        String::from_utf8_lossy(&old.stderr)
    );
    assert_eq!(get_from("127.0.0.4", http, "/api/runs", Some(new)).0, 200);
    assert_eq!(get_from("127.0.0.4", http, "/api/runs", Some(TOKEN)).0, 401);
    let (status, resp) = get_with(
        "127.0.0.5",
        http,
        "/runs",
        None,
        &format!("Cookie: nixfarm_session={old_cookie}\r\n"),
    );
    assert_eq!(status, 303, "the old cookie opens nothing: {resp}");
    // The streams admitted under the old token end, the watch saying why (and not asking
    // again with a token that would count as a wrong guess).
    let ended = wait_for(
        Duration::from_secs(20),
        "the old token's streams to end",
        || {
            let w = watch.try_wait().unwrap()?;
            page.try_wait().unwrap()?;
            rows.try_wait().unwrap()?;
            Some(w)
        },
    );
    assert!(!ended.success());
    let mut said = String::new();
    std::io::Read::read_to_string(&mut watch.stderr.take().unwrap(), &mut said).unwrap();
    assert!(said.contains("token was replaced"), "{said}");
    // The pages are told, to reload to the login form.
    for p in [&mut page, &mut rows] {
        let mut got = String::new();
        std::io::Read::read_to_string(&mut p.stdout.take().unwrap(), &mut got).unwrap();
        assert!(got.contains("event: token-replaced"), "{got}");
    }
    assert!(
        !coordinator.proc.log_text().contains(new),
        "the token is never logged"
    );
}

/// Logs in on the web UI's form with `token`; the session cookie it sets.
fn login_cookie(port: u16, token: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let form = format!("token={token}&next=%2Fruns");
    write!(
        s,
        "POST /login HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
        form.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.lines()
        .find_map(|l| {
            let v = l.strip_prefix("set-cookie: nixfarm_session=")?;
            Some(v.split(';').next()?.to_string())
        })
        .unwrap_or_else(|| panic!("no session cookie: {resp}"))
}

/// Behind a reverse proxy (real nginx, adding `X-Forwarded-For`) that `[http]
/// trusted_proxies` names, wrong tokens count against the client the proxy saw: one client
/// guessing does not lock out everyone behind the proxy, and the address a client writes
/// into `X-Forwarded-For` itself is not believed.
#[test]
fn behind_a_trusted_proxy_wrong_tokens_hold_back_the_client_not_the_proxy() {
    let dir = scratch();
    let (_coordinator, http) = with_token_and(dir.path(), "trusted_proxies = [\"127.0.0.1\"]\n");
    let (_nginx, proxy) = start_nginx(
        &dir.path().join("nginx"),
        &format!(
            "    location / {{\n      proxy_pass http://127.0.0.1:{http};\n      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n    }}\n"
        ),
    );
    assert_eq!(
        get_from("127.0.0.3", proxy, "/api/runs", Some(TOKEN)).0,
        200
    );
    for i in 0..10 {
        // Pretending to be 127.0.0.3.
        let (status, resp) = get_with(
            "127.0.0.2",
            proxy,
            "/api/runs",
            Some(&format!("guess-{i}")),
            "X-Forwarded-For: 127.0.0.3\r\n",
        );
        assert_eq!(status, 401, "guess {i}: {resp}");
    }
    let (status, resp) = get_from("127.0.0.2", proxy, "/api/runs", Some(TOKEN));
    assert_eq!(status, 429, "{resp}");
    // Through the same proxy, another client is not held back (nor charged the guesses).
    let (status, resp) = get_from("127.0.0.3", proxy, "/api/runs", Some(TOKEN));
    assert_eq!(status, 200, "{resp}");
}

#[test]
fn a_run_page_goes_live_in_a_real_browser() {
    let dir = scratch();
    let (coordinator, http) = with_token(dir.path());
    let repo = dir.path().join("repo");
    copy_tree(&example_repo(), &repo);
    // Submitted while no agent is connected: the page opens on a run that has not started.
    let out = cli_env(&coordinator.url, &["submit", repo.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = stdout(&out).trim().to_string();

    // Nothing without the token: pages send people to the login form, the API and badges
    // answer 401.
    let (status, resp) = get(http, &format!("/runs/{run}"), None);
    assert_eq!(status, 303, "{resp}");
    assert!(resp.contains("location: /login?next="), "{resp}");
    // Every answer says what a browser may run and load: this site's script and styles
    // only (the live page below works under it), no framing, no type sniffing.
    let headers = resp.to_ascii_lowercase();
    assert!(
        headers.contains("content-security-policy: default-src 'self'")
            && headers.contains("frame-ancestors 'none'")
            && headers.contains("x-content-type-options: nosniff"),
        "{resp}"
    );
    for path in [
        format!("/api/runs/{run}"),
        "/api/runs".into(),
        "/api/agents".into(),
        format!("/badge/{run}.svg"),
        format!("/runs/{run}/fix.patch"),
    ] {
        assert_eq!(get(http, &path, None).0, 401, "{path}");
        assert_eq!(get(http, &path, Some("a-wrong-token")).0, 401, "{path}");
    }
    // Which of the two, in the API's words.
    let (_, none) = get(http, "/api/runs", None);
    assert!(body(&none).contains("needs its client token"), "{none}");
    let (_, wrong) = get(http, "/api/runs", Some("a-wrong-token"));
    assert!(body(&wrong).contains("token sent was refused"), "{wrong}");

    let b = Browser::start();
    let base = format!("http://127.0.0.1:{http}");
    // Navigation is asynchronous to WebDriver's answers: wait for where a person would
    // land (a first navigation of a fresh browser may also show an error page: go again).
    let mut tries = 0;
    loop {
        b.goto(&format!("{base}/runs/{run}"));
        let landed = (0..50).any(|_| {
            let at = b.js("return location.pathname", json!([]));
            at == json!("/login") || {
                std::thread::sleep(Duration::from_millis(100));
                false
            }
        });
        if landed {
            break;
        }
        tries += 1;
        assert!(
            tries < 3,
            "not sent to the login page: {} shows {}",
            b.url(),
            b.js(
                "return document.documentElement.outerHTML.slice(0, 2000)",
                json!([])
            )
        );
    }
    // A wrong token is refused on the form.
    b.type_into("#token", "not-it");
    b.click("form.login button");
    b.wait_until(
        "the refusal",
        Duration::from_secs(10),
        "return document.body.textContent.includes(\"not this coordinator's\")",
    );
    b.type_into("#token", TOKEN);
    b.click("form.login button");
    b.wait_until(
        "the run page after logging in",
        Duration::from_secs(10),
        &format!("return location.pathname === '/runs/{run}' && !!document.getElementById('run')"),
    );
    // The token never appears in a page, and the cookie is not readable by scripts.
    let html = b.js("return document.documentElement.outerHTML", json!([]));
    assert!(!html.as_str().unwrap().contains(TOKEN));
    assert_eq!(b.js("return document.cookie", json!([])), json!(""));
    b.js("window.__nf_same_page = 42; return true", json!([]));
    b.screenshot(&artifacts().join("web-run-waiting.png"));

    // Now an agent: the page fills in and turns green without a reload.
    let host = Host::new(&dir.path().join("host"));
    let _agent = host
        .start_agent("web-1", &coordinator.url, None, 2)
        .unwrap();
    b.wait_until(
        "rows to appear and change live",
        Duration::from_secs(240),
        "return document.querySelectorAll('#packages tbody tr[data-status=ready]').length >= 9 \
         && document.getElementById('state').textContent === 'finished'",
    );
    assert_eq!(
        b.js("return window.__nf_same_page", json!([])),
        json!(42),
        "the page was reloaded"
    );
    let expected = expected();
    let rows = b.js(
        "return [...document.querySelectorAll('#packages tbody tr')].map(r => [r.dataset.attr, r.dataset.status])",
        json!([]),
    );
    let rows: std::collections::BTreeMap<String, String> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_str().unwrap().into(), r[1].as_str().unwrap().into()))
        .collect();
    for (attr, e) in expected.as_object().unwrap() {
        assert_eq!(
            rows.get(attr).map(String::as_str),
            e["status"].as_str(),
            "{attr} on the live page"
        );
    }
    assert!(
        b.text("#percent").starts_with("47.4"),
        "{}",
        b.text("#percent")
    );
    // The patch is offered once the run is over, still without a reload.
    b.wait_until(
        "the patch link",
        Duration::from_secs(10),
        "return !document.getElementById('patch').hidden",
    );
    assert_eq!(b.text("#fixes"), "6");
    b.screenshot(&artifacts().join("web-run-finished.png"));

    // Filter by status, then by name (typed).
    let needs_hash = expected
        .as_object()
        .unwrap()
        .values()
        .filter(|e| e["status"] == "needs-hash")
        .count();
    b.js(
        "const s = document.getElementById('status'); s.value = 'needs-hash'; \
         s.dispatchEvent(new Event('change')); return true",
        json!([]),
    );
    let visible = "return [...document.querySelectorAll('#packages tbody tr')].filter(r => !r.hidden).map(r => r.dataset.attr)";
    assert_eq!(
        b.js(visible, json!([])).as_array().unwrap().len(),
        needs_hash
    );
    b.type_into("#q", "rsky");
    assert_eq!(b.js(visible, json!([])), json!(["rsky"]));
    b.screenshot(&artifacts().join("web-run-filtered.png"));

    // A failed package's page shows its log tail.
    b.goto(&format!("{base}/runs/{run}/packages/ozone"));
    b.wait_until(
        "the package page",
        Duration::from_secs(10),
        "return !!document.getElementById('pkg-status')",
    );
    assert_eq!(b.text("#pkg-status"), "build-failed");
    assert!(!b.text("#log").is_empty());

    // The patch, fetched by the page's own link, applies to the repository.
    b.goto(&format!("{base}/runs/{run}"));
    b.wait_until(
        "the run page",
        Duration::from_secs(10),
        "return !!document.getElementById('fixes')",
    );
    assert_eq!(b.text("#fixes"), "6");
    let patch = b.js_async(
        "const done = arguments[arguments.length - 1]; \
         fetch(document.querySelector('a[href$=\"fix.patch\"]').href).then(r => r.text()).then(done)",
        json!([]),
    );
    let patch = patch.as_str().unwrap().to_string();
    assert!(patch.contains("+++ b/pkgs/"), "{patch}");
    let patch_file = dir.path().join("fix.patch");
    std::fs::write(&patch_file, &patch).unwrap();
    let check = std::process::Command::new("git")
        .args(["apply", "--check", "--verbose"])
        .arg(&patch_file)
        .current_dir(&repo)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "git apply --check: {}",
        stderr(&check)
    );

    // The agents page lists the agent, as connected.
    b.goto(&format!("{base}/agents"));
    b.wait_until(
        "the agents page",
        Duration::from_secs(10),
        "return !!document.getElementById('agents')",
    );
    let agents = b.text("#agents");
    assert!(
        agents.contains("web-1") && agents.contains("yes"),
        "{agents}"
    );
    b.screenshot(&artifacts().join("web-agents.png"));

    // The API's report is the CLI's, byte for byte; the badge has the numbers.
    let (status, resp) = get(http, &format!("/api/runs/{run}"), Some(TOKEN));
    assert_eq!(status, 200);
    let cli = cli_env(&coordinator.url, &["report", &run, "--format", "json"]);
    assert_eq!(body(&resp), stdout(&cli));
    let api: serde_json::Value = serde_json::from_str(body(&resp)).unwrap();
    assert!(
        api["packages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| !p["hash_fixes"].as_array().unwrap().is_empty()),
        "the coordinator found the hash fixes"
    );
    // Runs side by side (as a --matrix's are): the same run twice differs nowhere.
    let (status, resp) = get(http, &format!("/compare?runs={run},{run}"), Some(TOKEN));
    assert_eq!(status, 200, "{resp}");
    assert_eq!(body(&resp).matches("<tr data-attr=").count(), 19);
    assert!(!body(&resp).contains("class=\"differs\""));
    let (status, resp) = get(http, &format!("/badge/{run}.svg"), Some(TOKEN));
    assert_eq!(status, 200);
    let svg = body(&resp);
    assert!(resp.contains("image/svg+xml"));
    assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"), "{svg}");
    assert!(svg.contains(">9/19</text>"), "{svg}");
    // The latest run of a label is addressable too.
    let label = html_seg(repo.to_str().unwrap());
    let (status, by_label) = get(http, &format!("/badge/{label}.svg"), Some(TOKEN));
    assert_eq!(status, 200, "{by_label}");
    assert!(body(&by_label).contains(">9/19</text>"));
}

fn html_seg(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
