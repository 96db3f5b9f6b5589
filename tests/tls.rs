//! TLS on the wire (rustls): the CLI verifies the coordinator against a private CA and
//! presents its token; agents are admitted by a client certificate from the farm's CA;
//! everything else is refused with a message that says why.

use nixfarm_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", stderr(&out));
}

/// A CA and a certificate it signs; returns (ca.pem, cert.pem, key.pem).
fn pki(dir: &Path, ca: &str, leaf: &str, ext: &str) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = format!("{ca}.key");
    let ca_pem = format!("{ca}.pem");
    if !dir.join(&ca_pem).exists() {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &ca_key,
                "-out",
                &ca_pem,
                "-days",
                "2",
                "-subj",
                &format!("/CN={ca}"),
            ],
        );
    }
    let ext_file = format!("{leaf}.ext");
    std::fs::write(dir.join(&ext_file), ext).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{leaf}.key"),
            "-out",
            &format!("{leaf}.csr"),
            "-subj",
            &format!("/CN={leaf}"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{leaf}.csr"),
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &format!("{leaf}.pem"),
            "-days",
            "2",
            "-extfile",
            &ext_file,
        ],
    );
    (
        dir.join(ca_pem),
        dir.join(format!("{leaf}.pem")),
        dir.join(format!("{leaf}.key")),
    )
}

/// Client certificates' extensions.
const CLIENT_EXT: &str = "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n";

/// A coordinator behind TLS (its certificate from the farm's CA, for 127.0.0.1), admitting
/// agents by client certificates from that CA and the CLI by the token `cli-secret-1`,
/// listening on `listen`, with `extra` config: (it, the CA, its https:// URL on 127.0.0.1).
fn tls_coordinator(d: &Path, listen: &str, extra: &str) -> (Coordinator, PathBuf, String) {
    let server_ext = "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n";
    let (ca, srv_cert, srv_key) = pki(d, "farm-ca", "coordinator", server_ext);
    std::fs::write(d.join("client-token"), "cli-secret-1\n").unwrap();
    let cfg = d.join("coordinator.toml");
    std::fs::write(
        &cfg,
        format!(
            "[auth]\nclient_token_file = \"{}\"\n[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nclient_ca_file = \"{}\"\n{extra}",
            d.join("client-token").display(),
            srv_cert.display(),
            srv_key.display(),
            ca.display()
        ),
    )
    .unwrap();
    let coordinator = Coordinator::start_on(
        &d.join("state"),
        listen,
        &["--config", cfg.to_str().unwrap()],
    )
    .unwrap();
    let port = coordinator.url.rsplit(':').next().unwrap().to_string();
    let url = format!("https://127.0.0.1:{port}");
    (coordinator, ca, url)
}

/// An agent's open stream to the coordinator: what it sends, and what it is told.
type AgentStream = (
    tokio::sync::mpsc::Sender<nixfarm_proto::v1::AgentMessage>,
    tonic::Streaming<nixfarm_proto::v1::CoordinatorMessage>,
);

/// Registers agent `name` over the real protocol, played by hand, with the client
/// certificate `(cert, key)`: what it was told, and its stream (dropped, it disconnects).
fn by_hand(
    rt: &tokio::runtime::Runtime,
    url: &str,
    ca: &Path,
    (cert, key): (&Path, &Path),
    name: &str,
    takes_token: bool,
) -> Result<(nixfarm_proto::v1::Registered, AgentStream), tonic::Status> {
    use nixfarm_proto::v1 as pb;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
    let read = |p: &Path| std::fs::read(p).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(ca)))
        .identity(Identity::from_pem(read(cert), read(key)));
    rt.block_on(async {
        let channel = Channel::from_shared(url.to_string())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Register(pb::Register {
                name: name.into(),
                systems: vec!["x86_64-linux".into()],
                max_jobs: 1,
                holds_outputs: true,
                holds_in_builder_store: true,
                takes_farm_cache_token: takes_token,
                ..Default::default()
            })),
        })
        .await
        .unwrap();
        let mut from = client
            .connect_agent(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        match from.message().await?.and_then(|m| m.msg) {
            Some(pb::coordinator_message::Msg::Registered(r)) => Ok((r, (tx, from))),
            other => panic!("not registered: {other:?}"),
        }
    })
}

/// The HTTP status of the farm cache on `port` to a request with `token` (curl).
fn farm_cache_status(ca: &Path, port: u32, token: &str) -> String {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(ca)
        .arg("-H")
        .arg(format!("Authorization: Bearer {token}"))
        .arg(format!("https://127.0.0.1:{port}/nix-cache-info"))
        .output()
        .expect("curl");
    stdout(&out)
}

/// `nixfarm submit DIR --watch --format json` over TLS, as the CLI with its token: the
/// report.
fn submit_json(url: &str, ca: &Path, repo: &Path) -> serde_json::Value {
    let out = Command::new(bin("nixfarm"))
        .args([
            "submit",
            repo.to_str().unwrap(),
            "--watch",
            "--format",
            "json",
        ])
        .env("NIXFARM_COORDINATOR", url)
        .env("NIXFARM_TLS_CA", ca)
        .env("NIXFARM_TOKEN", "cli-secret-1")
        .output()
        .unwrap();
    serde_json::from_str(&stdout(&out))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stderr(&out)))
}

#[test]
fn tls_tokens_and_client_certificates() {
    let dir = scratch();
    let d = dir.path();
    let (coordinator, ca, url) = tls_coordinator(d, "127.0.0.1:0", "");
    let (_, agent_cert, agent_key) = pki(d, "farm-ca", "agent", CLIENT_EXT);
    let (_, rogue_cert, rogue_key) = pki(d, "rogue-ca", "rogue", CLIENT_EXT);
    let run_cli = |args: &[&str], extra_env: &[(&str, &str)]| {
        Command::new(bin("nixfarm"))
            .args(args)
            .env("NIXFARM_COORDINATOR", &url)
            .envs(extra_env.iter().copied())
            .output()
            .unwrap()
    };
    let ca_s = ca.to_str().unwrap();
    // The CLI with the CA and its token.
    let ok = run_cli(
        &["runs"],
        &[("NIXFARM_TLS_CA", ca_s), ("NIXFARM_TOKEN", "cli-secret-1")],
    );
    assert!(ok.status.success(), "{}", stderr(&ok));
    // Wrong token: refused, saying so.
    let bad = run_cli(
        &["runs"],
        &[("NIXFARM_TLS_CA", ca_s), ("NIXFARM_TOKEN", "guess")],
    );
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("token was refused"),
        "{}",
        stderr(&bad)
    );
    // No CA: the coordinator's certificate is not trusted.
    let untrusted = run_cli(&["runs"], &[("NIXFARM_TOKEN", "cli-secret-1")]);
    assert!(!untrusted.status.success());
    assert!(
        stderr(&untrusted).to_lowercase().contains("certificate"),
        "{}",
        stderr(&untrusted)
    );
    // Plain HTTP/2 against the TLS port fails instead of leaking anything.
    let plain = Command::new(bin("nixfarm"))
        .args(["runs"])
        .env("NIXFARM_COORDINATOR", &coordinator.url)
        .env("NIXFARM_TOKEN", "cli-secret-1")
        .output()
        .unwrap();
    assert!(!plain.status.success());

    // Agents: a certificate from the farm's CA admits one; no certificate and no token is
    // refused with a reason; a certificate from another CA never gets through the handshake.
    let host = Host::new(&d.join("host"));
    let agent_bin = bin("nixfarm-agent");
    let start = |name: &str, cert: Option<(&Path, &Path)>| {
        let mut argv: Vec<String> = vec![
            agent_bin.display().to_string(),
            "--coordinator".into(),
            url.clone(),
            "--name".into(),
            name.into(),
            "--tls-ca".into(),
            ca_s.into(),
            "--work-dir".into(),
            host.root.join("work").join(name).display().to_string(),
        ];
        if let Some((c, k)) = cert {
            argv.extend([
                "--tls-cert".into(),
                c.display().to_string(),
                "--tls-key".into(),
                k.display().to_string(),
            ]);
        }
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        host.command(&refs)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut good = start("good", Some((&agent_cert, &agent_key)));
    let env = [("NIXFARM_TLS_CA", ca_s), ("NIXFARM_TOKEN", "cli-secret-1")];
    wait_for(Duration::from_secs(30), "the certified agent", || {
        stdout(&run_cli(&["agents"], &env))
            .contains("good")
            .then_some(())
    });
    let anonymous = start("anonymous", None).wait_with_output().unwrap();
    assert!(!anonymous.status.success());
    assert!(
        stderr(&anonymous).contains("requires a client certificate"),
        "{}",
        stderr(&anonymous)
    );
    let mut rogue = start("rogue", Some((&rogue_cert, &rogue_key)));
    std::thread::sleep(Duration::from_secs(3));
    assert!(!stdout(&run_cli(&["agents"], &env)).contains("rogue"));
    let _ = rogue.kill();
    // Its log says which certificate, and which setting, where it said "transport error".
    let rogue = rogue.wait_with_output().unwrap();
    assert!(
        stderr(&rogue).contains("the coordinator refused this agent's client certificate"),
        "{}",
        stderr(&rogue)
    );
    // An agent without the farm's CA: the coordinator's certificate, named as such.
    let mut untrusting = host
        .command(&[
            agent_bin.to_str().unwrap(),
            "--coordinator",
            &url,
            "--name",
            "untrusting",
            "--work-dir",
            host.root.join("work/untrusting").to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let _ = untrusting.kill();
    let untrusting = untrusting.wait_with_output().unwrap();
    assert!(
        stderr(&untrusting).contains("UnknownIssuer")
            && stderr(&untrusting).contains("tls_ca_file names the CA that signed it"),
        "{}",
        stderr(&untrusting)
    );

    // A whole run over TLS.
    let repo = d.join("tiny");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(
        repo.join("flake.nix"),
        r#"{ outputs = { self }: { packages.x86_64-linux.hello = derivation { name = "hello-tls"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo hi > $out" ]; }; }; }"#,
    )
    .unwrap();
    let out = run_cli(
        &[
            "submit",
            repo.to_str().unwrap(),
            "--watch",
            "--format",
            "json",
        ],
        &env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["summary"]["ready"], 1, "{report}");
    // The output went to the farm cache, which is behind TLS like the gRPC services.
    let pushed = std::fs::read_dir(d.join("state/farm-cache"))
        .map(|e| {
            e.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".narinfo"))
                .count()
        })
        .unwrap_or(0);
    assert!(pushed > 0, "nothing reached the farm cache over TLS");
    // The token never shows in what the user sees.
    assert!(!stderr(&out).contains("cli-secret-1"));
    let _ = good.kill();
    let _ = good.wait();
}

/// Hosts that share nothing but the coordinator, admitted by client certificates alone (no
/// agent token anywhere), with the coordinator listening beyond loopback: the farm cache
/// still starts, each agent is issued a token of its own for it at registration (Nix
/// cannot present a certificate), and the two agents check each other's builds through it.
/// It used to stay off there for want of an agent token, and such a run had no way to move
/// derivations and outputs between the hosts.
#[test]
fn certificate_admitted_agents_on_separate_hosts_share_the_farm_cache() {
    let dir = scratch();
    let d = dir.path();
    // Every address: the farm cache listens beyond loopback too.
    let (coordinator, ca, url) =
        tls_coordinator(d, "0.0.0.0:0", "[scheduler]\ncross_check_builds = true\n");
    let log = wait_for(Duration::from_secs(10), "the farm cache", || {
        let l = coordinator.proc.log_text();
        (l.contains("farm cache listening") || l.contains("the farm cache is off")).then_some(l)
    });
    assert!(log.contains("farm cache listening"), "{log}");
    let ca_s = ca.to_str().unwrap();
    let mut agents = Vec::new();
    for name in ["one", "two"] {
        let (_, cert, key) = pki(d, "farm-ca", name, CLIENT_EXT);
        let host = Host::new(&d.join(format!("host-{name}")));
        let flags = [
            "--tls-ca",
            ca_s,
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ];
        agents.push(
            host.start_agent_with(name, &url, None, 1, &[], &flags)
                .unwrap(),
        );
    }
    let repo = stable_and_stamp_repo(d);
    let report = submit_json(&url, &ca, &repo);
    // Built on one host, checked on the other: everything travelled through the farm cache.
    assert_stamp_not_reproducible(&report);
    let pushed = std::fs::read_dir(d.join("state/farm-cache"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".narinfo"))
        .count();
    assert!(pushed > 0, "nothing reached the farm cache");
    // A fixed-output build there (a fetcher) is handed the CA file Nix trusts for the farm
    // cache: it must hold the public CAs as well as the farm's, or fetching from the
    // internet would fail. Its builder checks both.
    let marker = std::fs::read_to_string(&ca)
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .to_string();
    // (Public CAs to find only where the machine has a bundle: Debian's here.)
    let system_cas = if Path::new("/etc/ssl/certs/ca-certificates.crt").is_file() {
        "1"
    } else {
        ""
    };
    let fod = d.join("fod");
    std::fs::create_dir_all(&fod).unwrap();
    std::fs::write(
        fod.join("flake.nix"),
        format!(
            r#"{{ outputs = {{ self }}: {{ packages.x86_64-linux.fetcher = derivation {{
  name = "fetcher"; system = "x86_64-linux"; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
  impureEnvVars = [ "NIX_SSL_CERT_FILE" ]; marker = "{marker}"; system_cas = "{system_cas}";
  outputHashMode = "flat"; outputHashAlgo = "sha256";
  outputHash = "dc51b8c96c2d745df3bd5590d990230a482fd247123599548e0632fdbf97fc22";
  args = [ "-c" ''
    echo "CA file: $NIX_SSL_CERT_FILE, $(grep -c BEGIN "$NIX_SSL_CERT_FILE") certificates"
    grep -q "$marker" "$NIX_SSL_CERT_FILE" || {{ echo "no farm CA in it"; exit 1; }}
    [ -z "$system_cas" ] || [ "$(grep -c BEGIN "$NIX_SSL_CERT_FILE")" -gt 1 ] || {{ echo "the farm CA alone"; exit 1; }}
    echo ok > $out
  '' ];
}}; }}; }}"#
        ),
    )
    .unwrap();
    let report = submit_json(&url, &ca, &fod);
    let fetcher = &packages_by_attr(&report)["fetcher"];
    assert_eq!(fetcher["status"], "ready", "{fetcher}");
    // The issued tokens are secrets: in no log.
    let logs: String =
        agents.iter().map(|a| a.log_text()).collect::<String>() + &coordinator.proc.log_text();
    for a in &agents {
        let netrc = std::fs::read_to_string(
            d.join(format!("host-{}", a.name))
                .join("work/farm-cache/netrc"),
        )
        .unwrap();
        let token = netrc.split_whitespace().last().unwrap();
        assert_eq!(token.len(), 64, "an issued token: {netrc}");
        assert!(!logs.contains(token), "a token was logged");
    }
}

/// A farm cache token that leaked is taken back without a restart: the operator strikes it
/// from `STATE_DIR/farm-tokens` (here: removes the file), the farm cache refuses it within
/// seconds, and its agent, made to register again, is issued a new one that Nix (its netrc)
/// uses from then on; the agent goes on building.
#[test]
fn a_farm_cache_token_struck_from_its_file_is_refused_and_replaced() {
    let dir = scratch();
    let d = dir.path();
    let (coordinator, ca, url) = tls_coordinator(d, "127.0.0.1:0", "");
    let port: u32 = farm_cache_addr(&coordinator)
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let (_, cert, key) = pki(d, "farm-ca", "one", CLIENT_EXT);
    let host = Host::new(&d.join("host-one"));
    let flags = [
        "--tls-ca",
        ca.to_str().unwrap(),
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    let _agent = host
        .start_agent_with("one", &url, None, 1, &[], &flags)
        .unwrap();
    let netrc = d.join("host-one/work/farm-cache/netrc");
    let token_now = || {
        std::fs::read_to_string(&netrc)
            .ok()
            .and_then(|t| t.split_whitespace().last().map(String::from))
    };
    let old = wait_for(
        Duration::from_secs(30),
        "the agent's farm cache token",
        token_now,
    );
    assert_eq!(farm_cache_status(&ca, port, &old), "200");
    std::fs::remove_file(d.join("state/farm-tokens")).unwrap();
    let start = std::time::Instant::now();
    let new = loop {
        if let Some(t) = token_now().filter(|t| *t != old) {
            break t;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no new farm cache token; coordinator:\n{}\nagent:\n{}",
            coordinator.proc.log_text(),
            _agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        farm_cache_status(&ca, port, &old),
        "401",
        "the struck token"
    );
    assert_eq!(farm_cache_status(&ca, port, &new), "200");
    // Kept for the next restart, the old one not.
    let kept = std::fs::read_to_string(d.join("state/farm-tokens")).unwrap();
    assert!(kept.contains(&new) && !kept.contains(&old), "{kept}");
    // And the agent builds on, through the farm cache.
    let repo = d.join("after");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(
        repo.join("flake.nix"),
        r#"{ outputs = { self }: { packages.x86_64-linux.after = derivation {
  name = "after"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo ok > $out" ]; }; }; }"#,
    )
    .unwrap();
    let report = submit_json(&url, &ca, &repo);
    assert_eq!(
        packages_by_attr(&report)["after"]["status"],
        "ready",
        "{report}"
    );
    let logs = coordinator.proc.log_text() + &_agent.log_text();
    assert!(
        !logs.contains(&new) && !logs.contains(&old),
        "a token was logged"
    );
}

/// What a certificate-admitted agent is told of the farm cache when it registers, played
/// over the real protocol: one that takes an issued token gets the farm cache and a token;
/// one that predates issued tokens (it would have nothing to show there) is not told of
/// it, and the coordinator's log says to upgrade it.
#[test]
fn only_agents_that_can_get_into_the_farm_cache_are_told_of_it() {
    let dir = scratch();
    let d = dir.path();
    // A short lease: how long an agent's farm cache token outlives its stream.
    let (coordinator, ca, url) = tls_coordinator(
        d,
        "0.0.0.0:0",
        "[scheduler]\nlease_secs = 4\nheartbeat_secs = 1\n",
    );
    let (_, cert, key) = pki(d, "farm-ca", "hand", CLIENT_EXT);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let registered = |name: &str, takes_token: bool| {
        by_hand(&rt, &url, &ca, (&cert, &key), name, takes_token).unwrap()
    };
    let (new, _) = registered("new", true);
    assert_ne!(new.farm_cache_port, 0, "told of the farm cache");
    assert_eq!(new.farm_cache_token.len(), 64);
    assert!(new.farm_cache_token.bytes().all(|b| b.is_ascii_hexdigit()));
    // The same token when it comes back, once the coordinator has seen its first stream
    // end (until then the name is still connected, and refused as such).
    let (again, new_stream) =
        wait_for(
            Duration::from_secs(10),
            "the agent to come back",
            || match by_hand(&rt, &url, &ca, (&cert, &key), "new", true) {
                Err(e) if e.code() == tonic::Code::AlreadyExists => None,
                r => Some(r.unwrap()),
            },
        );
    assert_eq!(again.farm_cache_token, new.farm_cache_token);
    let (old, _old) = registered("old", false);
    assert_eq!(
        (old.farm_cache_port, old.farm_cache_token.as_str()),
        (0, ""),
        "an agent with nothing to show is not told of the farm cache"
    );
    let log = coordinator.proc.log_text();
    assert!(
        log.contains("not told of the farm cache") && log.contains("agent=\"old\""),
        "{log}"
    );
    assert!(!log.contains(&new.farm_cache_token), "a token was logged");
    // And `nixfarm agents` says which agent is without it, and what to do.
    let out = Command::new(bin("nixfarm"))
        .arg("agents")
        .env("NIXFARM_COORDINATOR", &url)
        .env("NIXFARM_TLS_CA", &ca)
        .env("NIXFARM_TOKEN", "cli-secret-1")
        .output()
        .unwrap();
    let listing = stdout(&out);
    let without = listing
        .split_once("without the farm cache")
        .map(|(_, rest)| rest.split("\n\n").next().unwrap_or(""))
        .unwrap_or_else(|| panic!("{listing}{}", stderr(&out)));
    assert!(without.contains("upgrade them"), "{listing}");
    let names: Vec<&str> = without.lines().skip(1).map(str::trim).collect();
    assert_eq!(names, ["old"], "{listing}");

    // The farm cache takes the issued token while its agent is connected, and for the
    // lease after; then not, until the agent is back (a retired agent's token lapses).
    let status = |token: &str| farm_cache_status(&ca, new.farm_cache_port, token);
    assert_eq!(status(&new.farm_cache_token), "200");
    // Connections that never start their TLS handshake hold up nobody else's (each one
    // used to stop the farm cache accepting for 10 s).
    let silent: Vec<std::net::TcpStream> = (0..3)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", new.farm_cache_port as u16)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let asked = std::time::Instant::now();
    assert_eq!(status(&new.farm_cache_token), "200");
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "answered after {:?}",
        asked.elapsed()
    );
    drop(silent);
    assert_eq!(status(&"0".repeat(64)), "401");
    drop(new_stream);
    assert_eq!(
        status(&new.farm_cache_token),
        "200",
        "within the lease after its stream ended"
    );
    let start = std::time::Instant::now();
    while status(&new.farm_cache_token) == "200" {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "the token still counts 20 s after its agent left (lease 4 s)"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(status(&new.farm_cache_token), "401");
    let (back, _back) = registered("new", true);
    assert_eq!(back.farm_cache_token, new.farm_cache_token);
    assert_eq!(status(&new.farm_cache_token), "200", "its agent is back");
}

/// An agent host is compromised: the operator adds its certificate's fingerprint (as
/// `openssl x509 -fingerprint -sha256` prints it, which `nixfarm agents` matches) to
/// `[tls] revoked_certs_file`. Without a restart, its agent is cut off, its farm cache token
/// refused, and it cannot register again; another agent goes on.
#[test]
fn a_revoked_certificate_is_cut_off_and_refused_without_a_restart() {
    let dir = scratch();
    let d = dir.path();
    let revoked = d.join("revoked-agents");
    std::fs::write(&revoked, "# none yet\n").unwrap();
    let (_coordinator, ca, url) = tls_coordinator(
        d,
        "127.0.0.1:0",
        &format!("revoked_certs_file = \"{}\"\n", revoked.display()),
    );
    let (_, bad_cert, bad_key) = pki(d, "farm-ca", "compromised", CLIENT_EXT);
    let (_, good_cert, good_key) = pki(d, "farm-ca", "keeper", CLIENT_EXT);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (bad, (_bad_tx, mut bad_stream)) =
        by_hand(&rt, &url, &ca, (&bad_cert, &bad_key), "compromised", true).unwrap();
    let (good, _good_stream) =
        by_hand(&rt, &url, &ca, (&good_cert, &good_key), "keeper", true).unwrap();
    let port = bad.farm_cache_port;
    assert_eq!(farm_cache_status(&ca, port, &bad.farm_cache_token), "200");

    // `nixfarm agents` names each certificate by the fingerprint openssl prints.
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(&bad_cert)
        .output()
        .unwrap();
    let line = stdout(&out);
    let hex: String = line
        .trim()
        .rsplit('=')
        .next()
        .unwrap()
        .replace(':', "")
        .to_lowercase();
    let agents = || {
        stdout(
            &Command::new(bin("nixfarm"))
                .arg("agents")
                .env("NIXFARM_COORDINATOR", &url)
                .env("NIXFARM_TLS_CA", &ca)
                .env("NIXFARM_TOKEN", "cli-secret-1")
                .output()
                .unwrap(),
        )
    };
    let listing = agents();
    assert!(
        listing.contains(&format!("compromised: {hex}")),
        "{hex} in:\n{listing}"
    );

    std::fs::write(&revoked, format!("# compromised, 2026-12-04\n{line}")).unwrap();
    // Cut off within the two seconds or so the file takes to be read again.
    rt.block_on(cut_off_saying(&mut bad_stream, "revoked"));
    assert_eq!(farm_cache_status(&ca, port, &bad.farm_cache_token), "401");
    let again = by_hand(&rt, &url, &ca, (&bad_cert, &bad_key), "compromised", true)
        .expect_err("registered again with a revoked certificate");
    assert_eq!(again.code(), tonic::Code::PermissionDenied);
    assert!(again.message().contains("revoked"), "{again:?}");
    let listing = agents();
    assert!(
        listing.contains(&format!("compromised: {hex} (revoked)"))
            && !listing.contains("keeper: (revoked)"),
        "{listing}"
    );
    // Nor under another name.
    assert!(by_hand(&rt, &url, &ca, (&bad_cert, &bad_key), "other", true).is_err());
    // The other agent is still connected, and its token still counts.
    assert_eq!(farm_cache_status(&ca, port, &good.farm_cache_token), "200");
    let conflict = by_hand(&rt, &url, &ca, (&good_cert, &good_key), "keeper", true)
        .expect_err("a second keeper");
    assert_eq!(conflict.code(), tonic::Code::AlreadyExists, "{conflict:?}");
}

/// An input the run overrides with a remote flake is fetched as the override says, and that
/// flake's own inputs as its `flake.lock` says. A lock there naming a path on the agent's
/// own disk is refused before Nix fetches it (which would copy that path into the agent's
/// store), as it is in the run's own flake. The flakes are served over HTTPS by nginx with
/// a private CA the agent's Nix trusts.
#[test]
fn a_flake_overriding_an_input_is_checked_like_the_runs_own() {
    let dir = scratch();
    let d = dir.path();
    let (ca, cert, key) = pki(d, "flakes-ca", "flakes", "subjectAltName=IP:127.0.0.1\n");
    let ca = ca.to_str().unwrap().to_string();
    // What the agent's host keeps on its disk.
    let secret = d.join("agent-secret");
    std::fs::create_dir_all(&secret).unwrap();
    let marker = "nixfarm-override-secret-marker";
    std::fs::write(secret.join("token"), format!("{marker}\n")).unwrap();
    let www = d.join("www");
    let src = d.join("src");
    for (name, text) in [
        (
            "good",
            "{ outputs = { self }: { value = \"good\"; }; }".to_string(),
        ),
        (
            "bad",
            format!(
                "{{ inputs.k = {{ url = \"path:{}\"; flake = false; }};\n  outputs = {{ self, k }}: {{ value = \"bad\"; }}; }}",
                secret.display()
            ),
        ),
    ] {
        std::fs::create_dir_all(src.join(name)).unwrap();
        std::fs::write(src.join(name).join("flake.nix"), text).unwrap();
    }
    // Its author locks it on their own machine, where the path is theirs.
    lock_flake(&src.join("bad"), &[]);
    std::fs::create_dir_all(&www).unwrap();
    for name in ["good", "bad"] {
        let tar = Command::new("tar")
            .arg("czf")
            .arg(www.join(format!("{name}.tar.gz")))
            .arg("-C")
            .arg(&src)
            .arg(name)
            .status()
            .unwrap();
        assert!(tar.success());
    }
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (_nginx, _) = start_nginx(
        &d.join("nginx"),
        &format!(
            "    listen 127.0.0.1:{tls_port} ssl;\n    ssl_certificate {};\n    ssl_certificate_key {};\n    location / {{ root {}; }}\n",
            cert.display(),
            key.display(),
            www.display()
        ),
    );
    let served = |name: &str| format!("https://127.0.0.1:{tls_port}/{name}.tar.gz");
    // The run's own flake takes `dep`, locked to the good one.
    let repo = d.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(
        repo.join("flake.nix"),
        format!(
            r#"{{ inputs.dep.url = "{}";
  outputs = {{ self, dep }}: {{ packages.x86_64-linux.p = derivation {{
    name = "p-${{dep.value}}"; system = "x86_64-linux"; builder = "/bin/sh";
    args = [ "-c" "echo ok > $out" ]; }}; }}; }}"#,
            served("good")
        ),
    )
    .unwrap();
    lock_flake(&repo, &[("NIX_SSL_CERT_FILE", &ca)]);
    let coordinator = Coordinator::start(&d.join("coordinator")).unwrap();
    let host = Host::new(&d.join("host"));
    let _agent = host
        .start_agent_with_env(
            "a",
            &coordinator.url,
            None,
            1,
            &[("NIX_SSL_CERT_FILE", &ca)],
        )
        .unwrap();
    let submit = |extra: &[&str]| {
        let mut args = vec!["submit", repo.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = cli(&coordinator.url, &args);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out).trim().to_string()
    };
    // As locked, it evaluates and builds: the agent fetches over HTTPS.
    let run = submit(&[]);
    let report = wait_for_state(&coordinator.url, &run, "finished", Duration::from_secs(60));
    assert_eq!(report["summary"]["ready"], 1, "{report}");
    // Overridden with the flake whose lock names the agent's path: refused, fetching none.
    let run = submit(&["--override-input", "dep", &served("bad")]);
    let report = wait_for_state(&coordinator.url, &run, "failed", Duration::from_secs(60));
    let error = report["error"].as_str().unwrap();
    assert!(
        error.contains("the flake overriding input 'dep'") && error.contains("path:"),
        "{error}"
    );
    let store = host.root.join("nix/store");
    let copied = std::fs::read_dir(&store)
        .unwrap()
        .flatten()
        .any(|e| std::fs::read_to_string(e.path().join("token")).is_ok_and(|t| t.contains(marker)));
    assert!(!copied, "the agent's path was copied into its store");
}

/// `nix flake lock` in `dir` on this machine (its own store), with `env`.
fn lock_flake(dir: &Path, env: &[(&str, &str)]) {
    let lock = Command::new("nix")
        .args([
            "--extra-experimental-features",
            "nix-command flakes",
            "flake",
            "lock",
        ])
        .current_dir(dir)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(lock.status.success(), "{}", stderr(&lock));
}
