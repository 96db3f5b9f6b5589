//! The container images, checked without a container engine: each Containerfile's final
//! stage is read, and the coordinator's config and entrypoint run as a plain process.

use super::*;

/// The instructions of a Containerfile's last stage, as (KEYWORD, arguments): comments
/// dropped, continuation lines joined.
fn final_stage(containerfile: &str) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(deploy(containerfile)).unwrap();
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    let last_from = instructions
        .iter()
        .rposition(|i| i.to_ascii_uppercase().starts_with("FROM "))
        .unwrap_or_else(|| panic!("{containerfile} has no FROM"));
    instructions[last_from..]
        .iter()
        .map(|i| {
            let (k, a) = i
                .split_once(char::is_whitespace)
                .unwrap_or((i.as_str(), ""));
            (k.to_ascii_uppercase(), a.trim().to_string())
        })
        .collect()
}

/// The arguments of every `keyword` instruction of a stage.
fn instructions<'a>(stage: &'a [(String, String)], keyword: &str) -> Vec<&'a str> {
    stage
        .iter()
        .filter(|(k, _)| k == keyword)
        .map(|(_, a)| a.as_str())
        .collect()
}

/// The exec-form ENTRYPOINT of a stage (a JSON array).
fn entrypoint(stage: &[(String, String)]) -> Vec<String> {
    let e = instructions(stage, "ENTRYPOINT");
    let last = e.last().expect("an ENTRYPOINT");
    serde_json::from_str(last)
        .unwrap_or_else(|err| panic!("ENTRYPOINT {last} is not a JSON array: {err}"))
}

/// Where a stage's COPY puts `source` (a path in the build context or a build stage).
fn copied_to(stage: &[(String, String)], source: &str) -> String {
    instructions(stage, "COPY")
        .iter()
        .find_map(|args| {
            let words: Vec<&str> = args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let (dest, sources) = words.split_last()?;
            sources
                .contains(&source)
                .then(|| match dest.strip_suffix('/') {
                    Some(dir) => format!("{dir}/{}", source.rsplit('/').next().unwrap()),
                    None => dest.to_string(),
                })
        })
        .unwrap_or_else(|| panic!("the image does not COPY {source}"))
}

/// The user a stage runs as is not root.
fn assert_non_root(stage: &[(String, String)], image: &str) {
    let user = *instructions(stage, "USER")
        .last()
        .unwrap_or_else(|| panic!("{image}: no USER"));
    let name = user.split(':').next().unwrap();
    assert!(name != "root" && name != "0", "{image} runs as {user}");
}

/// Every `KEY = "ADDRESS"` of a TOML text whose key ends in `listen`, as
/// ("section.key", address); commented lines skipped.
fn listeners(toml: &str) -> Vec<(String, String)> {
    let mut section = String::new();
    let mut found = Vec::new();
    for line in toml.lines().map(str::trim) {
        if let Some(s) = line.strip_prefix('[') {
            section = s.trim_end_matches(']').to_string();
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        let value = value.split('#').next().unwrap().trim();
        if let Some(addr) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"'))
            && key.ends_with("listen")
        {
            let name = match section.as_str() {
                "" => key.to_string(),
                s => format!("{s}.{key}"),
            };
            found.push((name, addr.to_string()));
        }
    }
    found
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{addr} has no port"))
}

/// `n` distinct free ports (held together while they are picked).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("0.0.0.0:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// `text` with each (from, to) replaced on its uncommented lines only.
fn rewrite_values(text: &str, replace: &[(String, String)]) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let mut line = line.to_string();
        if !line.trim_start().starts_with('#') {
            for (from, to) in replace {
                line = line.replace(from.as_str(), to);
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// One raw HTTP GET on loopback; the whole response (status line first).
fn http_get(port: u16, path: &str, auth: Option<&str>) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Starts the coordinator as its image does: the ENTRYPOINT's arguments, the image's
/// config file replaced by `config` (the image's config text) with only what cannot exist
/// here moved: state_dir into `dir`, each listener to a free port on the same address.
/// Returns the process and each listener's port by key ("listen", "farm_cache.listen"...).
fn start_like_the_image(
    config: &str,
    dir: &std::path::Path,
) -> (Proc, std::collections::BTreeMap<String, u16>) {
    use std::io::BufRead;
    let stage = final_stage("container/Containerfile");
    let entrypoint = entrypoint(&stage);
    let in_image = copied_to(&stage, "deploy/container/coordinator.toml");
    let shipped = nixfarm_coordinator::Config::load(&deploy("container/coordinator.toml")).unwrap();
    let quoted = |s: &str| format!("\"{s}\"");
    let state = dir.join("state");
    let mut replace = vec![(
        quoted(&shipped.state_dir.display().to_string()),
        quoted(&state.display().to_string()),
    )];
    let listeners = listeners(config);
    let mut ports = std::collections::BTreeMap::new();
    for ((key, addr), port) in listeners.iter().zip(free_ports(listeners.len())) {
        let host = addr.rsplit_once(':').unwrap().0;
        replace.push((quoted(addr), quoted(&format!("{host}:{port}"))));
        ports.insert(key.clone(), port);
    }
    let text = rewrite_values(config, &replace);
    // Nothing else changed: the lines that differ are those of the moved values.
    for (before, after) in config.lines().zip(text.lines()) {
        assert!(
            before == after
                || replace
                    .iter()
                    .any(|(from, _)| before.contains(from.as_str())),
            "rewrote more than a path or port: {before}"
        );
    }
    let file = dir.join("coordinator.toml");
    std::fs::write(&file, &text).unwrap();
    let exe = std::path::Path::new(&entrypoint[0])
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(exe, "nixfarm-coordinator", "ENTRYPOINT {entrypoint:?}");
    let args: Vec<std::ffi::OsString> = entrypoint[1..]
        .iter()
        .map(|a| {
            if *a == in_image {
                file.clone().into_os_string()
            } else {
                a.into()
            }
        })
        .collect();
    let log = dir.join("coordinator.log");
    let mut child = std::process::Command::new(bin(&exe))
        .args(&args)
        .env_remove("NIXFARM_COORDINATOR_CONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let proc = Proc {
        child,
        name: "coordinator (image)".into(),
        log,
    };
    assert!(
        line.trim()
            .strip_prefix("listening on ")
            .is_some_and(|a| port_of(a) == ports["listen"]),
        "the image's coordinator did not start: {line}\n{}",
        proc.log_text()
    );
    (proc, ports)
}

#[test]
fn the_coordinator_image_starts_with_its_config_and_entrypoint_and_serves_metrics() {
    let stage = final_stage("container/Containerfile");
    let entrypoint = entrypoint(&stage);
    // The ENTRYPOINT runs the binary the image copies in, with the config it copies in.
    assert_eq!(
        copied_to(&stage, "/src/target/release/nixfarm-coordinator"),
        entrypoint[0]
    );
    let in_image = copied_to(&stage, "deploy/container/coordinator.toml");
    let at = entrypoint
        .iter()
        .position(|a| *a == in_image)
        .unwrap_or_else(|| panic!("ENTRYPOINT {entrypoint:?} does not read {in_image}"));
    assert!(["--config", "-c"].contains(&entrypoint[at - 1].as_str()));
    assert_non_root(&stage, "the coordinator image");
    let path = deploy("container/coordinator.toml");
    let shipped = std::fs::read_to_string(&path).unwrap();
    let cfg = nixfarm_coordinator::Config::load(&path).expect("container/coordinator.toml");
    cfg.validate()
        .expect("container/coordinator.toml is in range");
    // It starts with no secret mounted: it names none.
    assert!(cfg.auth.agent_token_file.is_none() && cfg.auth.client_token_file.is_none());
    assert!(cfg.tls.cert_file.is_none() && cfg.tls.key_file.is_none());
    // The state lives in the image's volume.
    let volumes: Vec<&str> = instructions(&stage, "VOLUME")
        .into_iter()
        .flat_map(str::split_whitespace)
        .collect();
    assert!(
        volumes
            .iter()
            .any(|v| std::path::Path::new(v) == cfg.state_dir),
        "state_dir {} is not a VOLUME ({volumes:?})",
        cfg.state_dir.display()
    );
    // Every listener is on all addresses, on a fixed port, and the image EXPOSEs exactly
    // those ports.
    let listeners = listeners(&shipped);
    for a in [
        Some(&cfg.listen),
        cfg.metrics_listen.as_ref(),
        cfg.farm_cache.listen.as_ref(),
    ] {
        let a = a.expect("the gRPC, metrics and farm cache listeners are all set");
        assert!(
            listeners.iter().any(|(_, l)| l == a),
            "{a} not found in {listeners:?}"
        );
    }
    for (key, addr) in &listeners {
        assert!(addr.starts_with("0.0.0.0:"), "{key} = {addr}: not 0.0.0.0");
        assert_ne!(
            port_of(addr),
            0,
            "{key} = {addr}: a container publishes fixed ports"
        );
    }
    let listened: std::collections::BTreeSet<u16> =
        listeners.iter().map(|(_, a)| port_of(a)).collect();
    let exposed: std::collections::BTreeSet<u16> = instructions(&stage, "EXPOSE")
        .into_iter()
        .flat_map(str::split_whitespace)
        .map(|p| p.trim_end_matches("/tcp").parse().expect("EXPOSE port"))
        .collect();
    assert_eq!(
        exposed, listened,
        "EXPOSE and the config's listeners differ"
    );

    // And it runs: the binary, the ENTRYPOINT's arguments, that config.
    let dir = scratch();
    let (mut proc, ports) = start_like_the_image(&shipped, dir.path());
    let metrics = http_get(ports["metrics_listen"], "/metrics", None);
    assert!(
        metrics.lines().next().unwrap_or_default().contains(" 200 ")
            && metrics.contains("nixfarm_"),
        "{metrics}"
    );
    // Every other EXPOSEd port serves; the farm cache stays off beyond loopback without
    // the agent token (as documented).
    for (key, port) in &ports {
        let open = std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok();
        assert_eq!(
            open,
            key != "farm_cache.listen",
            "{key} on port {port}\n{}",
            proc.log_text()
        );
    }
    // The image's STOPSIGNAL stops it cleanly (as PID 1 it has no default SIGTERM action).
    let signal: &str = instructions(&stage, "STOPSIGNAL")
        .last()
        .copied()
        .map_or("SIGTERM", str::trim);
    let st = std::process::Command::new("kill")
        .arg(format!("-{}", signal.trim_start_matches("SIG")))
        .arg(proc.child.id().to_string())
        .status()
        .unwrap();
    assert!(st.success());
    let exit = wait_for(
        std::time::Duration::from_secs(10),
        "the coordinator to stop",
        || proc.child.try_wait().unwrap(),
    );
    assert!(exit.success(), "{signal}: {exit}\n{}", proc.log_text());
}

#[test]
fn the_coordinator_image_with_tokens_switched_on_as_documented_serves_the_farm_cache() {
    let shipped = std::fs::read_to_string(deploy("container/coordinator.toml")).unwrap();
    // The switch its header and deploy/README.md give:
    //   sed -E 's/^#(\[auth\]|agent_token_file|client_token_file)/\1/'
    let with_auth: String = shipped
        .lines()
        .map(|l| {
            if ["#[auth]", "#agent_token_file", "#client_token_file"]
                .iter()
                .any(|p| l.starts_with(p))
            {
                &l[1..]
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    assert_eq!(
        shipped
            .lines()
            .zip(with_auth.lines())
            .filter(|(a, b)| a != b)
            .count(),
        3,
        "the [auth] lines to uncomment"
    );
    // The secrets, where podman mounts them (/run/secrets/NAME), moved to this test's
    // directory.
    let dir = scratch();
    let secrets = dir.path().join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    let mut named = 0;
    for line in with_auth
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
    {
        if let Some(name) = line
            .split("\"/run/secrets/")
            .nth(1)
            .and_then(|r| r.split('"').next())
        {
            std::fs::write(secrets.join(name), format!("token-{name}\n")).unwrap();
            named += 1;
        }
    }
    assert_eq!(named, 2, "the agent and client token files");
    let text = rewrite_values(
        &with_auth,
        &[(
            "\"/run/secrets/".into(),
            format!("\"{}/", secrets.display()),
        )],
    );
    let (proc, ports) = start_like_the_image(&text, dir.path());
    // With the tokens every listener serves, the farm cache too.
    for (key, port) in &ports {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok(),
            "{key} on port {port}\n{}",
            proc.log_text()
        );
    }
    let cfg = nixfarm_coordinator::Config::load(&dir.path().join("coordinator.toml")).unwrap();
    let token =
        std::fs::read_to_string(cfg.auth.agent_token_file.expect("agent_token_file")).unwrap();
    let cache = ports["farm_cache.listen"];
    let status = |auth: Option<&str>| {
        http_get(cache, "/nix-cache-info", auth)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()
    };
    assert!(status(None).contains(" 401 "), "{}", status(None));
    let bearer = format!("Bearer {}", token.trim());
    assert!(
        status(Some(bearer.as_str())).contains(" 200 "),
        "{}",
        status(Some(bearer.as_str()))
    );
}

#[test]
fn the_agent_image_config_parses_and_leaves_computed_defaults_to_the_agent() {
    let stage = final_stage("container/Containerfile.agent");
    let entrypoint = entrypoint(&stage);
    let at = entrypoint
        .iter()
        .position(|a| a.ends_with("/nixfarm-agent"))
        .unwrap_or_else(|| panic!("ENTRYPOINT {entrypoint:?} runs no nixfarm-agent"));
    assert_eq!(
        copied_to(&stage, "/src/target/release/nixfarm-agent"),
        entrypoint[at]
    );
    let help = stdout(
        &std::process::Command::new(bin("nixfarm-agent"))
            .arg("--help")
            .output()
            .unwrap(),
    );
    for flag in entrypoint[at + 1..].iter().filter(|a| a.starts_with("--")) {
        assert!(help.contains(flag.as_str()), "nixfarm-agent has no {flag}");
    }
    let in_image = copied_to(&stage, "deploy/container/agent.toml");
    assert!(
        entrypoint[at + 1..]
            .windows(2)
            .any(|w| w[0] == "--config" && w[1] == in_image),
        "ENTRYPOINT {entrypoint:?} does not read {in_image}"
    );
    // It starts as root only to start Nix's daemon: the entrypoint script runs the agent as
    // the agent's user (see the_agent_image_builds_as_build_users_through_its_own_daemon).
    let script = copied_to(&stage, "deploy/container/agent-entrypoint");
    assert_eq!(
        entrypoint.get(at - 1),
        Some(&script),
        "ENTRYPOINT {entrypoint:?}"
    );
    assert!(
        instructions(&stage, "USER").is_empty(),
        "the agent image sets USER"
    );
    let env = instructions(&stage, "ENV").join(" ");
    assert!(
        env.contains("NIXFARM_AGENT_USER=nixfarm-agent"),
        "ENV {env}"
    );
    let a = nixfarm_agent::AgentConfig::load(&deploy("container/agent.toml"))
        .expect("container/agent.toml");
    a.validate().expect("container/agent.toml is in range");
    // It starts with no secret mounted: it names none (the token comes from the
    // environment or a flag).
    assert!(a.token_file.is_none() && a.signing_key_file.is_none());
    assert!(a.tls_cert_file.is_none() && a.tls_key_file.is_none());
    // What the agent computes for itself is left to it: the container's CPUs, /dev/kvm,
    // host name.
    let d = nixfarm_agent::AgentConfig::default();
    assert_eq!(a.max_jobs, d.max_jobs);
    assert_eq!(a.features, d.features);
    assert_eq!(a.name, d.name);
    // Its store and its work directory are volumes.
    let volumes: Vec<&str> = instructions(&stage, "VOLUME")
        .into_iter()
        .flat_map(str::split_whitespace)
        .collect();
    for v in ["/nix", a.work_dir.to_str().unwrap()] {
        assert!(volumes.contains(&v), "{v} is not a VOLUME ({volumes:?})");
    }
    // Multi-user Nix: the daemon's build users build, the agent is a trusted user of it;
    // sandbox off (a container refuses it).
    assert_eq!(
        copied_to(&stage, "deploy/container/nix.conf"),
        "/etc/nix/nix.conf"
    );
    let nix_conf = std::fs::read_to_string(deploy("container/nix.conf")).unwrap();
    for setting in [
        "build-users-group = nixbld",
        "trusted-users = nixfarm-agent",
        "sandbox = false",
    ] {
        assert!(
            nix_conf.lines().any(|l| l.trim() == setting),
            "nix.conf lacks {setting}"
        );
    }
    let run = instructions(&stage, "RUN").join(" ");
    for made in [
        "groupadd --system --gid 30000 nixbld",
        "\"nixbld$i\"",
        "nixfarm-agent",
    ] {
        assert!(run.contains(made), "the image does not make {made}: {run}");
    }
}

/// The agent image's start, as a plain process: its entrypoint script (as root, in a PID and
/// mount namespace of its own with an empty /nix, as a container has) with the image's
/// nix.conf and agent.toml, the agent's user being `nobody` here. A package whose builder
/// tries to change its input in the store builds, but as one of the daemon's build users:
/// the input is unchanged, and every store path is root's. (With the image before it, the
/// agent owned the store and builds ran as the agent's user: the input was overwritten.) Its
/// /nix starts as that image's volume was, the agent's user's: the store becomes root's.
#[test]
fn the_agent_image_builds_as_build_users_through_its_own_daemon() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch();
    set_mode(dir.path(), 0o755);
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).unwrap();
    let nobody = 65534;
    let (nix, work, home, conf) = (
        dir.path().join("nix"),
        dir.path().join("work"),
        dir.path().join("home"),
        dir.path().join("etc-nix"),
    );
    for d in [&nix, &work, &home, &conf] {
        std::fs::create_dir_all(d).unwrap();
    }
    set_mode(&nix, 0o755);
    // The /nix volume as the image before this one left it: the agent's user owned the store.
    for d in ["store", "var/nix/gcroots/per-user"] {
        std::fs::create_dir_all(nix.join(d)).unwrap();
    }
    let old = nix.join("store/00000000000000000000000000000000-built-before");
    std::fs::write(&old, "").unwrap();
    for d in [
        "",
        "store",
        "store/00000000000000000000000000000000-built-before",
        "var",
        "var/nix",
        "var/nix/gcroots",
        "var/nix/gcroots/per-user",
    ] {
        std::os::unix::fs::chown(nix.join(d), Some(nobody), Some(nobody)).unwrap();
    }
    for d in [&work, &home] {
        std::os::unix::fs::chown(d, Some(nobody), Some(nobody)).unwrap();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    // The image's files, with what names the image's user and volumes moved to this test's.
    let nix_conf = std::fs::read_to_string(deploy("container/nix.conf")).unwrap();
    std::fs::write(
        conf.join("nix.conf"),
        rewrite_values(
            &nix_conf,
            &[(
                "trusted-users = nixfarm-agent".into(),
                "trusted-users = nobody".into(),
            )],
        ),
    )
    .unwrap();
    let shipped = nixfarm_agent::AgentConfig::load(&deploy("container/agent.toml")).unwrap();
    let quoted = |s: &str| format!("\"{s}\"");
    let agent_toml = dir.path().join("agent.toml");
    std::fs::write(
        &agent_toml,
        rewrite_values(
            &std::fs::read_to_string(deploy("container/agent.toml")).unwrap(),
            &[
                (quoted(&shipped.coordinator), quoted(&coordinator.url)),
                (
                    quoted(&shipped.work_dir.display().to_string()),
                    quoted(&work.display().to_string()),
                ),
            ],
        ),
    )
    .unwrap();
    let log = dir.path().join("agent.log");
    let child = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--pid", "--fork"])
        .args(["--kill-child", "--mount-proc", "sh", "-c"])
        // Not exec'd: the namespace's first process keeps the signal --kill-child sets, which
        // a change of user (the entrypoint's setpriv) clears, so killing unshare ends them all
        // (as a container's end does).
        .arg("set -e; mount --bind \"$0\" /nix; \"$@\"")
        .arg(&nix)
        .arg(deploy("container/agent-entrypoint"))
        .arg(bin("nixfarm-agent"))
        .arg("--config")
        .arg(&agent_toml)
        .args(["--name", "image-agent"])
        .env_remove("NIX_CONFIG")
        .env("NIX_CONF_DIR", &conf)
        .env("NIXFARM_AGENT_USER", "nobody")
        .env("HOME", &home)
        .env("XDG_CACHE_HOME", home.join(".cache"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let agent = Proc {
        child,
        name: "image-agent".into(),
        log,
    };
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(
        repo.join("flake.nix"),
        r#"{ outputs = { self }: let
      drv = name: script: derivation {
        inherit name; system = "x86_64-linux"; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
        args = [ "-c" script ];
      };
      dep = drv "dep" "echo good > $out";
    in { packages.x86_64-linux = {
      inherit dep;
      # Tries to overwrite its input in the store, then says who it ran as and what it read.
      tamper = drv "tamper" ''
        chmod u+w ${dep} 2>/dev/null; echo evil > ${dep} 2>/dev/null
        echo "uid=$(id -u) dep=$(cat ${dep})" > $out
      '';
    }; }; }"#,
    )
    .unwrap();
    let out = cli(&coordinator.url, &["submit", repo.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = stdout(&out).trim().to_string();
    let report = wait_for(
        std::time::Duration::from_secs(120),
        "the run to end",
        || {
            let r: serde_json::Value = serde_json::from_str(&stdout(&cli(
                &coordinator.url,
                &["report", &run, "--format", "json"],
            )))
            .ok()?;
            ["finished", "failed", "cancelled"]
                .contains(&r["state"].as_str()?)
                .then_some(r)
        },
    );
    let output = |attr: &str| {
        let p = report["packages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["attr"] == attr)
            .unwrap_or_else(|| panic!("no {attr} in {report}\n{}", agent.log_text()));
        assert_eq!(p["status"], "ready", "{p}\n{}", agent.log_text());
        let path = p["outputs"]["out"].as_str().unwrap().to_string();
        // The store is the volume's: this test's /nix.
        dir.path().join(path.trim_start_matches('/'))
    };
    let (dep, tamper) = (output("dep"), output("tamper"));
    assert_eq!(std::fs::read_to_string(&dep).unwrap(), "good\n");
    let said = std::fs::read_to_string(&tamper).unwrap();
    let uid: u32 = said
        .trim()
        .strip_prefix("uid=")
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{said}"));
    assert!(
        uid != 0 && uid != nobody,
        "the builder ran as {uid}: {said}"
    );
    assert!(said.ends_with("dep=good\n"), "{said}");
    for p in [&dep, &tamper, &nix.join("store"), &old] {
        let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(p).unwrap());
        assert_eq!(owner, 0, "{} is {owner}'s", p.display());
    }
    // The agent itself is not root: its process, the entrypoint's last exec, is nobody's.
    let agent_uid = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let parent = |pid: u32| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                let (_, rest) = stat.rsplit_once(") ")?;
                rest.split_whitespace().nth(1)?.parse::<u32>().ok()
            };
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "nixfarm-agent")
                && parent(*pid).and_then(parent) == Some(agent.child.id())
        })
        .find_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            status.lines().find_map(|l| {
                l.strip_prefix("Uid:")?
                    .split_whitespace()
                    .next()?
                    .parse::<u32>()
                    .ok()
            })
        });
    assert_eq!(agent_uid, Some(nobody), "{}", agent.log_text());
}

// ---- systemd: `systemd-analyze security` rates the plain units (the NixOS module sets the
// same directives). Before this hardening the agent was rated 7.9 "EXPOSED", the
// coordinator 2.4.
